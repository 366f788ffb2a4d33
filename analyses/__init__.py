"""Analyses: one module per method, each an `Analysis` that `interp.score` drives.

Every `Analysis` subclass with a `name` defined in a module of this package is registered, by name: adding an
analysis is adding its module (docs/adding-an-analysis.md).
"""

import importlib
import pkgutil

from .base import Analysis, NotApplicableError, Options

# How the analyses are listed (`--help`, errors, the dashboard): these first, every other one after them by name.
LISTED_FIRST = ("summary", "retrieval", "sinks", "taxonomy", "vit", "vhd", "circuits")


def _registered() -> dict[str, Analysis]:
    """One instance of every named Analysis subclass in this package's modules, by name (in listing order)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    found, todo = {}, list(Analysis.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if "name" in vars(cls):
            if cls.name in found:
                raise RuntimeError(f"two analyses are called {cls.name!r}")
            found[cls.name] = cls()
    rank = {name: i for i, name in enumerate(LISTED_FIRST)}
    return dict(sorted(found.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


ANALYSES: dict[str, Analysis] = _registered()


def get_analysis(name: str) -> Analysis:
    """The registered analysis called `name`; ValueError listing the known ones otherwise."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known analyses: {', '.join(ANALYSES)}")
    return ANALYSES[name]


__all__ = ["ANALYSES", "Analysis", "NotApplicableError", "Options", "get_analysis"]
