"""Analyses: one module per method, each a registered `Analysis` that `interp.score` drives."""

from .base import Analysis, NotApplicableError, Options
from .circuits import Circuits
from .retrieval import Retrieval
from .sinks import Sinks
from .summary import Summary
from .taxonomy import Taxonomy
from .vhd import VHD
from .vit import VitHeads

ANALYSES: dict[str, Analysis] = {a.name: a for a in (Summary(), Retrieval(), Sinks(), Taxonomy(), VitHeads(), VHD(),
                                                Circuits())}


def get_analysis(name: str) -> Analysis:
    """The registered analysis called `name`; ValueError listing the known ones otherwise."""
    if name not in ANALYSES:
        raise ValueError(f"unknown analysis {name!r}; known analyses: {', '.join(ANALYSES)}")
    return ANALYSES[name]


__all__ = ["ANALYSES", "Analysis", "NotApplicableError", "Options", "get_analysis"]
