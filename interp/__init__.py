"""interp: trace, score and browse the attention heads of LLMs, ViTs and vision-language models.

The public names are imported on first use (PEP 562), so that commands that only read the store (`interp runs`,
`show`, `export`, `models`) start without importing torch and transformers.
"""

from importlib import import_module

__version__ = "0.1.0"

_WHERE = {
    "ALIASES": "catalog", "DEFAULT_MODEL": "catalog", "FAMILIES": "catalog", "Family": "catalog", "Tower": "catalog",
    "UnsupportedFamilyError": "catalog", "discover": "families", "family_for": "families",
    "Model": "models", "ModelLoadError": "models", "load_model": "models",
    "ImageGrid": "layout", "TokenLayout": "layout", "token_layout": "layout",
    "Atlas": "atlases", "atlas": "atlases", "compare_atlases": "atlases", "open_atlas": "atlases",
    "ScoreResult": "results", "list_runs": "results", "open_run": "results", "score": "scoring",
    "CorruptRunError": "store", "RunNotFoundError": "store", "Store": "store", "StoreError": "store",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:  # a submodule (interp.families, interp.hooks, ...) not imported yet
        try:
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'interp' has no attribute {name!r}") from None
    value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
