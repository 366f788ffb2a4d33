"""Progress bars on stderr, shown only to a person watching a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


class Progress:
    """Makes tqdm bars that are silent when `enabled` is False (default: stderr is a terminal)."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    def bar(self, iterable=None, *, total: int | None = None, desc: str = "", leave: bool = True) -> tqdm:
        return tqdm(iterable, total=total, desc=desc, leave=leave, disable=not self.enabled, file=sys.stderr,
                    dynamic_ncols=True)

    def status(self, desc: str) -> tqdm:
        """A bar without a count, for one long step (loading a model): shows its elapsed time."""
        return tqdm(total=None, desc=desc, bar_format="{desc} [{elapsed}]", disable=not self.enabled,
                    file=sys.stderr)


QUIET = Progress(False)


def as_progress(progress) -> Progress:
    """A `Progress` from what `score` and its kin take: a Progress, True / None (bars on a terminal), or False."""
    return progress if isinstance(progress, Progress) else Progress(progress) if progress else QUIET
