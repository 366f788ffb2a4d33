"""interp: trace, score and browse the attention heads of LLMs, ViTs and vision-language models."""

from .families import FAMILIES, Family, Tower, UnsupportedFamilyError, family_for
from .models import ALIASES, DEFAULT_MODEL, Model, ModelLoadError, load_model
from .layout import ImageGrid, TokenLayout, token_layout

__version__ = "0.1.0"

__all__ = [
    "ALIASES", "DEFAULT_MODEL", "FAMILIES", "Family", "ImageGrid", "Model", "TokenLayout", "token_layout", "ModelLoadError", "Tower",
    "UnsupportedFamilyError", "family_for", "load_model",
]
