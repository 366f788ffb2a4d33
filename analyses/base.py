"""What every analysis is: a registered method with one interface, driven sample by sample by `interp.score`.

An analysis plans its samples (small JSON descriptions, stored in the run so a resumed run redoes exactly the
same work), scores one sample at a time into a table of per-head rows (the unit that is saved and never
redone), and aggregates the finished samples' rows into the heads table (`layer`, `head`, `kv_head`, one column
per score).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import pandas as pd

from interp.app.figures import score_by_layer
from interp.families import FAMILIES
from interp.models import Model
from interp.params import Params, named_paths
from interp.progress import Progress


class NotApplicableError(ValueError):
    """The analysis does not apply to this model's family."""


@dataclass(frozen=True)
class Options:
    """Options every analysis takes.

    layers / heads: which layers and query heads to score (None: all). samples: how many samples (None: the
    analysis's default). max_tokens: longest input in tokens (None: the analysis's default). backend: capture
    backend ("hf", "transformer-lens", "nnsight"). seed: for every random choice.
    """

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    samples: int | None = None
    max_tokens: int | None = None
    backend: str = "hf"
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Options:
        d = dict(d)
        for key in ("layers", "heads"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class Role:
    """A kind of head an analysis recognises from one score column of its heads table (a head atlas's roles).

    name: the role (e.g. "retrieval"). score: the heads-table column it reads. rule: "threshold" (score > threshold;
    score < threshold for sign −1; |score| > threshold for sign 0; ≥ / ≤ when `inclusive`) or "top" (the
    max(1, round(fraction · n)) heads of the n scored ones with the highest score, lowest for sign −1, largest |score|
    for sign 0; ties kept in table order) or "class" (the heads whose label column `score`, e.g. taxonomy's
    `pattern`, equals `value`). param: the analysis parameter that sets the threshold (the run's value wins over
    `threshold`). description: the rule in words, and where it comes from. A head with no score (NaN) never has the
    role.
    """

    name: str
    score: str
    rule: str = "threshold"
    threshold: float | None = None
    fraction: float | None = None
    sign: int = 1
    inclusive: bool = False
    param: str | None = None
    description: str = ""
    value: str | None = None

    def __post_init__(self):
        if self.rule not in ("threshold", "top", "class"):
            raise ValueError(f"role {self.name!r}: rule must be 'threshold', 'top' or 'class', got {self.rule!r}")
        if self.rule == "class" and self.value is None:
            raise ValueError(f"role {self.name!r}: a 'class' rule needs the label value it matches")
        if self.sign not in (1, -1, 0):
            raise ValueError(f"role {self.name!r}: sign must be 1, -1 or 0 (|score|), got {self.sign!r}")
        if self.rule == "top" and not (self.fraction is not None and 0 < self.fraction <= 1):
            raise ValueError(f"role {self.name!r}: a 'top' rule needs a fraction in (0, 1], got {self.fraction!r}")
        if self.rule == "threshold" and self.threshold is None and self.param is None:
            raise ValueError(f"role {self.name!r}: a 'threshold' rule needs a threshold or a param")

    def resolved(self, params: dict) -> Role:
        """This role with its threshold read from a run's parameters (where `param` names one that is set)."""
        if self.param is not None and params.get(self.param) is not None:
            return replace(self, threshold=float(params[self.param]))
        return self

    def apply(self, values: pd.Series) -> pd.Series:
        """Which heads have the role: a boolean Series on `values`' index (`values`: one score, or for a "class"
        rule one label, per head)."""
        if self.rule == "class":
            return (values == self.value).fillna(False).astype(bool)
        values = pd.to_numeric(values, errors="coerce").astype(float)
        key = values if self.sign == 1 else -values if self.sign == -1 else values.abs()
        if self.rule == "threshold":
            if self.threshold is None:
                raise ValueError(f"role {self.name!r}: no threshold (its parameter {self.param!r} is unset)")
            t = self.threshold if self.sign != -1 else -self.threshold
            hit = key >= t if self.inclusive else key > t
            return hit.fillna(False).astype(bool)
        scored = key.dropna()
        k = max(1, round(self.fraction * len(scored))) if len(scored) else 0
        chosen = scored.sort_values(ascending=False, kind="stable").index[:k]
        return pd.Series(values.index.isin(chosen), index=values.index)


class Analysis:
    """Base of every analysis. Subclasses set the class attributes and implement plan / score_sample /
    aggregate; `interp.score` does the rest (store, resume, progress)."""

    name: ClassVar[str]
    description: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]         # family kinds it applies to: "llm", "encoder", "vit", "lvlm"
    scores: ClassVar[dict[str, str]]         # score column -> what it means (the heads table's columns, in order)
    Params: ClassVar[type[Params]] = Params  # the analysis's own parameters (a dataclass of `param` fields)
    sample_tables: ClassVar[tuple[str, ...]] = ()  # names of the per-sample tables score_sample may return
    signed: ClassVar[bool] = False           # scores are signed effects, ranked by magnitude
    sample_columns: ClassVar[dict[str, str]] = {}  # score -> the samples-table column behind it, where names differ
    describe: ClassVar[tuple[str, ...]] = ()  # samples-table columns that say what a sample is (dashboard hover)
    roles: ClassVar[tuple[Role, ...]] = ()   # the kinds of head its scores recognise (interp.atlases)

    def check(self, model: Model) -> None:
        """Raise NotApplicableError when the model's family is not one this analysis supports."""
        if model.family.kind not in self.kinds:
            fams = ", ".join(f.name for f in FAMILIES if f.kind in self.kinds)
            raise NotApplicableError(
                f"analysis {self.name!r} does not apply to {model.name} (family {model.family.name}, a "
                f"{model.family.kind}); it supports the {'/'.join(self.kinds)} families: {fams}")

    @property
    def params(self) -> dict[str, Any]:
        """The analysis's parameters and their defaults (JSON values)."""
        return self.Params.defaults()

    def resolve(self, params: dict) -> dict:
        """The full, checked parameter set (JSON values): defaults overridden by `params`; unknown names, values
        of the wrong type, outside their choices or bounds refused with a ValueError naming the parameter."""
        return self.Params.resolve(params)

    def read_paths(self, model: Model, params: dict) -> tuple[str, ...]:
        """The path parameters (`Spec.path`) this analysis reads for this model and parameters (default: all)."""
        return tuple(name for name, (spec, _, _) in self.Params.specs().items() if spec.path)

    def check_paths(self, model: Model, params: dict) -> None:
        """Refuse a file given to a path parameter that this analysis does not read for this model (taxonomy's images
        on a language model): it would be hashed and kept for nothing."""
        read = self.read_paths(model, params)
        for name, (spec, _, _) in self.Params.specs().items():
            if name not in read and named_paths(spec, params.get(name)):
                raise ValueError(f"{self.name} parameter {name}: {self.name} does not read it for {model.name} (a "
                                 f"{model.family.kind}); leave --{name.replace('_', '-')} out")

    def stored_params(self, meta: dict) -> dict:
        """The parameters a stored run (its `meta`) was scored with, under today's names (see `Params.read`)."""
        return self.Params.read(meta["params"])

    def score_columns(self, model: Model, params: dict) -> dict[str, str]:
        """The heads table's score columns for this model and parameters (default: all of `scores`)."""
        return dict(self.scores)

    def roles_of(self, params: dict, columns) -> tuple[Role, ...]:
        """The roles a run with these parameters (JSON values) and heads-table score `columns` has: the declared
        `roles` whose score it has, thresholds read from its parameters."""
        return tuple(role.resolved(params) for role in self.roles if role.score in columns)

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        """The samples to score, as JSON-able dicts (deterministic given options.seed)."""
        raise NotImplementedError

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        """The model inputs of one planned sample (what the tokenizer / processor returned), exactly as
        `score_sample` feeds them to the model: the dashboard recomputes a sample's attention from them."""
        raise NotImplementedError

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> pd.DataFrame | dict[str, pd.DataFrame]:
        """Per-head rows for one sample: `layer`, `head`, `kv_head`, and the analysis's per-sample columns; or a
        dict with those rows under "samples" and per-sample tables (named in `sample_tables`) beside them."""
        raise NotImplementedError

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        """The heads table from every finished sample's rows (`samples` has a `sample` column)."""
        raise NotImplementedError

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Extra tables computed once every sample is scored (e.g. an intervention test), stored as
        `<name>.parquet` beside the per-sample tables (`extras`, all samples concatenated, stored as they are).
        Redone as a whole when a run resumes."""
        return {}

    def sample_column(self, score: str) -> str:
        """The samples-table column that shows a heads-table `score` sample by sample (recorded in the run)."""
        return self.sample_columns.get(score, score)

    def view(self, result) -> list:
        """The dashboard's analysis tab for a run (a `ScoreResult`; user inputs at `result.kept_plan`): plotly
        figures and `Note`s, laid out in a grid. Default: the first score per layer."""
        return [score_by_layer(result.heads, result.scores[0])]

    def report(self, result) -> list[str]:
        """Lines the CLI prints under the ranked tables (a `ScoreResult`'s headline numbers)."""
        return []


def head_rows(layer: int, heads, kv_heads, **columns) -> pd.DataFrame:
    """Per-head rows of one layer: `layer`, `head`, `kv_head`, then `columns` ((H,) arrays or scalars)."""
    heads = [int(h) for h in heads]
    return pd.DataFrame({"layer": [layer] * len(heads), "head": heads, "kv_head": [int(h) for h in kv_heads],
                         **columns})
