"""interp: trace, score and browse the attention heads of LLMs, ViTs and vision-language models."""

from .families import FAMILIES, Family, Tower, UnsupportedFamilyError, discover, family_for
from .models import ALIASES, DEFAULT_MODEL, Model, ModelLoadError, load_model
from .layout import ImageGrid, TokenLayout, token_layout
from .results import ScoreResult, list_runs, open_run
from .scoring import score
from .store import CorruptRunError, RunNotFoundError, Store, StoreError

__version__ = "0.1.0"

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "FAMILIES", "Family", "ImageGrid", "Model", "TokenLayout", "token_layout", "ModelLoadError", "Tower",
    "UnsupportedFamilyError", "discover", "family_for", "load_model", "ScoreResult", "list_runs", "open_run", "score",
    "CorruptRunError", "RunNotFoundError", "Store", "StoreError",
]
