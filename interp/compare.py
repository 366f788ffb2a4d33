"""Comparing two head rankings: the overlap of their top heads and the agreement of the full scores."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

Head = tuple[int, int]


def head_label(layer, head) -> str:
    """A head in L-H notation, the one notation of heads everywhere: `12-3`."""
    return f"{int(layer)}-{int(head)}"


@dataclass(frozen=True)
class Overlap:
    """The top-k heads of two rankings. shared / only_a / only_b: (layer, head) pairs, best first in A (B for
    only_b); jaccard = |A ∩ B| / |A ∪ B|; of_smaller = |A ∩ B| / min(|A|, |B|)."""

    top_a: list[Head]
    top_b: list[Head]
    shared: list[Head]
    only_a: list[Head]
    only_b: list[Head]

    @property
    def jaccard(self) -> float:
        union = len(set(self.top_a) | set(self.top_b))
        return len(self.shared) / union if union else 0.0

    @property
    def of_smaller(self) -> float:
        smaller = min(len(self.top_a), len(self.top_b))
        return len(self.shared) / smaller if smaller else 0.0


def top_heads(heads: pd.DataFrame, score: str, k: int, ascending: bool = False) -> list[Head]:
    """The k best heads of a heads table by `score` (highest first unless `ascending`), NaN scores left out."""
    if score not in heads.columns:
        raise ValueError(f"no score {score!r} in this heads table")
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    ranked = heads.dropna(subset=[score]).sort_values(score, ascending=ascending, kind="stable")
    return [(int(r.layer), int(r.head)) for r in ranked.head(k).itertuples()]


def top_overlap(a: pd.DataFrame, score_a: str, b: pd.DataFrame, score_b: str, k: int) -> Overlap:
    """The overlap of the top-k heads of run A (by score_a) and run B (by score_b)."""
    return overlap_of(top_heads(a, score_a, k), top_heads(b, score_b, k))


def overlap_of(top_a: list[Head], top_b: list[Head]) -> Overlap:
    """The overlap of two head sets (e.g. two circuits), each listed best first."""
    in_b, in_a = set(top_b), set(top_a)
    return Overlap(top_a, top_b, [h for h in top_a if h in in_b], [h for h in top_a if h not in in_b],
                   [h for h in top_b if h not in in_a])


def rank_correlation(a: pd.DataFrame, score_a: str, b: pd.DataFrame, score_b: str) -> float:
    """Spearman's rank correlation of two score columns over the heads both tables score."""
    both = a[["layer", "head", score_a]].merge(b[["layer", "head", score_b]], on=["layer", "head"],
                                               suffixes=("_a", "_b")).dropna()
    if len(both) < 2:
        return float("nan")
    x, y = both.iloc[:, 2].rank(), both.iloc[:, 3].rank()
    return float(x.corr(y))
