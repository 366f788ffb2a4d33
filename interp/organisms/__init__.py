"""Small models trained here on synthetic tasks with known mechanisms (the built-in `organism-*` aliases)."""
