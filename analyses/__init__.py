"""Analyses: one module per method, each an `Analysis` that `interp.score` drives.

Every `Analysis` subclass with a `name` defined in a module of this package is registered, by name: adding an
analysis is adding its module (README, "Adding an analysis").
"""

import importlib
import pkgutil

from .base import Analysis, NotApplicableError, Options


def _registered() -> dict[str, Analysis]:
    """One instance of every named Analysis subclass in this package's modules, by name (sorted)."""
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
    return dict(sorted(found.items()))


ANALYSES: dict[str, Analysis] = _registered()


def get_analysis(name: str) -> Analysis:
    """The registered analysis called `name`; ValueError listing the known ones otherwise."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known analyses: {', '.join(ANALYSES)}")
    return ANALYSES[name]


__all__ = ["ANALYSES", "Analysis", "NotApplicableError", "Options", "get_analysis"]
