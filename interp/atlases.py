"""A head atlas: what each head of one model *is*, from every completed run of it (issue 30).

`Atlas(runs)` joins the heads tables of completed runs of one model (one run per analysis) into one table, applies
each analysis's declared roles (`Analysis.roles`, e.g. retrieval's "retrieval head: retrieval_score > 0.1"), and
answers: a head's card (its scores, ranks, percentiles and roles), how roles co-occur beyond chance, how scores
correlate, and where in depth each role lives. Pure pandas / numpy, deterministic; the shell names no role.

Column names: a score is `<analysis>.<score>` (e.g. `retrieval.retrieval_score`), a role `<analysis>.<role>`
(e.g. `taxonomy.induction`).
"""

from __future__ import annotations

import html
import math
import os
from dataclasses import asdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.io as pio

from interp.analyses import ANALYSES
from interp.analyses.base import Role
from interp.app.figures import overlap_matrix, role_grid

from .cluster import Cluster, Workers, as_cluster
from .results import ScoreResult, as_store, open_run
from .scoring import open_work, run_slug
from .store import is_atlas, read_meta, write_text
from .sweep import score_combination
from .together import score_together

KEYS = ["layer", "head"]

# What `atlas` scores with, per preset: analysis -> the options (samples, max_tokens) and parameters of its run.
# "quick" is sized for a small model on a laptop's CPU (SmolLM2-135M in minutes): few samples, short inputs (summary,
# lookback and sinks read the same four texts, one shared forward each), sinks on natural text alone (what its sink
# role reads; Gu et al.'s random and repeated tokens are in "full"), one needle at one length and depth with no
# masking ablation, EAP alone for circuits; "full" is every analysis's defaults.
PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "summary": {"samples": 4, "max_tokens": 64},
        "sinks": {"samples": 4, "max_tokens": 64, "inputs": ["natural"]},
        "taxonomy": {"samples": 4, "max_tokens": 64},
        "lookback": {"samples": 4, "max_tokens": 64},
        "retrieval": {"lengths": [256], "depths": [50], "n_needles": 1, "mask_k": [0], "max_new_tokens": 8},
        "circuits": {"samples": 2, "methods": "eap", "batch": 8},
        "vit": {"samples": 4, "batch": 8},
        "vhd": {"samples": 2, "max_new_tokens": 8},
    },
    "full": {},
}
OPTION_KEYS = ("layers", "heads", "samples", "max_tokens", "backend", "seed")  # a setting that is not a parameter


class Atlas:
    """The heads of one model across completed runs.

    heads: one row per (layer, head) any run scored — `layer`, `head`, `kv_head`, then for every score of every run
    `<analysis>.<score>`, `<analysis>.<score>:rank` (1 = highest; by |score| for a signed analysis; ties share the
    best rank) and `<analysis>.<score>:percentile` (100 · share of the scored heads at or below it, in the same
    order). A head a run did not score has NaN there.
    roles: one row per head — `layer`, `head`, then one boolean column per role `<analysis>.<role>`.
    scores: the score columns, run by run in the analysis's order. labels: the text columns a "class" role reads
    (`taxonomy.pattern`), `<analysis>.<column>` in `heads`, with no rank. rules: role column -> its `Role` (thresholds as
    the run was scored). runs: analysis -> run id. model: the model's name.
    """

    def __init__(self, runs: Iterable[ScoreResult]):
        runs = list(runs)
        if not runs:
            raise ValueError("an atlas needs at least one completed run")
        models = {r.meta["model"]["name"] for r in runs}
        if len(models) > 1:
            raise ValueError(f"an atlas is of one model; these runs score {', '.join(sorted(models))}")
        for r in runs:
            if r.status != "complete":
                raise ValueError(f"run {r.id} ({r.analysis}) is {r.status}: an atlas reads completed runs only")
        names = [r.analysis for r in runs]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"an atlas takes one run per analysis; several runs of {', '.join(twice)}")
        self.model: str = models.pop()
        self.identity: dict = runs[0].meta["model"]  # the model as its runs recorded it (name, family, config hash)
        self.runs: dict[str, str | None] = {r.analysis: r.id for r in runs}
        self.skipped: dict[str, str] = {}  # analysis -> why it has no run here (set by `atlas`)
        self.id: str | None = None  # the atlas's store entry, once saved (`save_atlas`) or opened (`open_atlas`)
        self.preset: str | dict | None = None  # the preset it was built with (a name or the settings), where known

        base = (pd.concat([r.heads[["layer", "head", "kv_head"]] for r in runs])
                .drop_duplicates(KEYS).sort_values(KEYS, kind="stable").reset_index(drop=True))
        base[KEYS] = base[KEYS].astype(int)
        columns, self.scores, self.labels = {}, [], []
        self._scored_by: dict[str, str] = {}  # score column -> analysis
        for r in runs:
            signed = r.meta.get("signed", getattr(ANALYSES.get(r.analysis), "signed", False))
            table = r.heads.assign(layer=r.heads["layer"].astype(int), head=r.heads["head"].astype(int))
            table = base[KEYS].merge(table, on=KEYS, how="left")
            for score in r.scores:
                if score not in table.columns:
                    continue
                col = f"{r.analysis}.{score}"
                values = pd.to_numeric(table[score], errors="coerce").astype(float)
                key = values.abs() if signed else values
                columns[col] = values
                columns[f"{col}:rank"] = key.rank(ascending=False, method="min")
                columns[f"{col}:percentile"] = 100 * key.rank(pct=True, method="max")
                self.scores.append(col)
                self._scored_by[col] = r.analysis
            known = ANALYSES.get(r.analysis)
            for label in dict.fromkeys(role.score for role in getattr(known, "roles", ()) if role.rule == "class"):
                if label in table.columns:  # a label a role reads (taxonomy's pattern class): kept as text
                    columns[f"{r.analysis}.{label}"] = table[label].astype(object).where(table[label].notna())
                    self.labels.append(f"{r.analysis}.{label}")
                    self._scored_by[f"{r.analysis}.{label}"] = r.analysis
        self.heads: pd.DataFrame = pd.concat([base, pd.DataFrame(columns, index=base.index)], axis=1)

        self.rules: dict[str, Role] = {}
        self._role_scores: dict[str, str] = {}  # role column -> the score column it reads
        roles = {}
        for r in runs:
            analysis = ANALYSES.get(r.analysis)
            if analysis is None:  # a run of an analysis this interp does not know: its scores, no roles
                continue
            for role in analysis.roles_of(analysis.stored_params(r.meta), [*r.scores, *r.heads.columns]):
                name, score = f"{r.analysis}.{role.name}", f"{r.analysis}.{role.score}"
                if score not in self.heads.columns:
                    continue
                roles[name] = role.apply(self.heads[score]).to_numpy(bool)
                self.rules[name] = role
                self._role_scores[name] = score
        self.roles: pd.DataFrame = pd.concat([base[KEYS], pd.DataFrame(roles, index=base.index, dtype=bool)], axis=1)

    @classmethod
    def open(cls, runs: Iterable[str | os.PathLike], store=None) -> Atlas:
        """The atlas of stored runs (ids, unique id prefixes or paths) in `store` (default: the default store)."""
        return cls(open_run(r, store) for r in runs)

    @property
    def role_names(self) -> list[str]:
        """The role columns, run by run in each analysis's order."""
        return list(self.rules)

    def __repr__(self) -> str:
        return (f"Atlas({self.model!r}, {len(self.heads)} heads, runs={list(self.runs)}, {len(self.scores)} scores, "
                f"{len(self.rules)} roles)")

    def _scored(self, role: str) -> np.ndarray:
        """(heads,) bool: the heads that have a score for the column `role` reads."""
        return self.heads[self._role_scores[role]].notna().to_numpy()

    def card(self, layer: int, head: int) -> dict:
        """Everything the atlas knows of one head: {"layer", "head", "kv_head", "scores": {column: {"value", "rank",
        "percentile", "run"}}, "labels": {label column: its text}, "roles": [role columns it has], "runs": {analysis:
        run id}}. KeyError for a head no run scored."""
        at = self.heads.index[(self.heads["layer"] == layer) & (self.heads["head"] == head)]
        if not len(at):
            raise KeyError(f"head {layer}-{head}: no run in this atlas of {self.model} scored it")
        row, roles = self.heads.loc[at[0]], self.roles.loc[at[0]]
        scores = {col: {"value": _num(row[col]), "rank": _num(row[f"{col}:rank"]),
                        "percentile": _num(row[f"{col}:percentile"]), "run": self.runs[self._scored_by[col]]}
                  for col in self.scores}
        labels = {col: (None if pd.isna(row[col]) else str(row[col])) for col in self.labels}
        return {"layer": int(layer), "head": int(head), "kv_head": int(row["kv_head"]), "scores": scores,
                "labels": labels, "roles": [name for name in self.rules if bool(roles[name])], "runs": dict(self.runs)}

    def overlaps(self, n_permutations: int = 2000, seed: int = 0) -> pd.DataFrame:
        """Role × role co-occurrence, one row per pair of roles (in `role_names` order, a before b), over the heads
        both roles' scores cover (N of them): `role_a`, `role_b`, `n`, `n_a`, `n_b`, `both`, `jaccard`
        (|A ∩ B| / |A ∪ B|), `expected` (its mean when B's heads are any n_b of the N, independent of A: Σ_x
        P(x) · x / (n_a + n_b − x) with x hypergeometric), `p_value` (permutation test: B's membership shuffled over
        the N heads `n_permutations` times by `np.random.default_rng(seed)` — a fresh generator per pair, each
        permutation the argsort of a row of `rng.random((n_permutations, N))`; (1 + #{J_perm ≥ J}) / (1 +
        n_permutations)), `p_exact` (the same test's exact value, P(x ≥ |A ∩ B|): J grows with x for fixed sizes).
        Jaccard, expected and p-values are NaN when neither role has a head."""
        names, rows = self.role_names, []
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                keep = self._scored(a) & self._scored(b)
                x, y = self.roles[a].to_numpy()[keep], self.roles[b].to_numpy()[keep]
                rows.append({"role_a": a, "role_b": b, **_overlap(x, y, n_permutations, seed)})
        return pd.DataFrame(rows, columns=["role_a", "role_b", "n", "n_a", "n_b", "both", "jaccard", "expected",
                                           "p_value", "p_exact"])

    def correlations(self) -> pd.DataFrame:
        """Score × score Spearman rank correlations (scores × scores, indexed by score column) over the heads both
        scores cover (signed scores as they are); NaN where fewer than 2 heads or a constant score."""
        return self.heads[self.scores].corr(method="spearman", min_periods=2)

    def layer_profiles(self) -> pd.DataFrame:
        """Per layer, the fraction of its heads in each role (layers × roles, indexed by `layer`), out of the heads
        the role's score covers (NaN where it covers none)."""
        frac = pd.DataFrame({name: self.roles[name].where(self._scored(name)).astype(float) for name in self.rules},
                            index=self.roles.index)
        return frac.groupby(self.roles["layer"]).mean()

    def summary_lines(self, p_max: float = 0.05) -> list[str]:
        """The atlas in words (what `interp atlas` and `interp show ATLAS` print): each role with its heads (L-H),
        the role pairs that overlap beyond chance (permutation p < `p_max`), the runs and the analyses skipped."""
        lines = ["Roles:"]
        for name in self.role_names:
            heads = [f"{r.layer}-{r.head}" for r in self.roles[self.roles[name]].itertuples()]
            lines.append(f"  {name} ({len(heads)}): {', '.join(heads) or '-'}")
        lines.append(f"Overlaps beyond chance (p < {p_max:g}):")
        shown = self.overlaps().query("p_value < @p_max")
        lines += [f"  {o.role_a} & {o.role_b}: {o.both} heads, Jaccard {o.jaccard:.2f} (chance {o.expected:.2f}), "
                  f"p = {o.p_value:.4f}" for o in shown.itertuples()] or ["  none"]
        lines.append("Runs:")
        lines += [f"  {analysis:<10} {run}" for analysis, run in self.runs.items()]
        lines += [f"  {analysis:<10} skipped: {why}" for analysis, why in self.skipped.items()]
        return lines

    def table(self) -> pd.DataFrame:
        """One table of the atlas (what `interp export ATLAS` writes): `heads`' columns, then each role as a boolean
        column `role:<analysis>.<role>`."""
        roles = self.roles.drop(columns=KEYS).add_prefix("role:")
        return pd.concat([self.heads, roles], axis=1)

    def to_html(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write one self-contained HTML page of the atlas to `path` (replaced atomically) and return it: the role
        grid and the role overlap matrix (plotly, its JavaScript inlined: it opens offline from disk) and every
        head's card (scores with rank and percentile, roles, run ids) with a search box. A path that exists and is
        not a regular file (a folder, a symlink, a device) is refused."""
        path = Path(path).expanduser()
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symlink" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(f"{path} is {kind}: the atlas page is written to a regular file")
        esc = html.escape
        title = title or f"Head atlas of {self.model}"
        grid = pio.to_html(role_grid(self), full_html=False, include_plotlyjs=True, div_id="role-grid")
        matrix = pio.to_html(overlap_matrix(self), full_html=False, include_plotlyjs=False, div_id="overlaps")
        runs = "".join(f"<li>{esc(a)}: <code>{esc(str(r))}</code></li>" for a, r in self.runs.items())
        runs += "".join(f"<li>{esc(a)}: skipped ({esc(why)})</li>" for a, why in self.skipped.items())
        cards = []
        for layer, head in zip(self.heads["layer"], self.heads["head"]):
            card = self.card(int(layer), int(head))
            label = f"{card['layer']}-{card['head']}"
            rows = "".join(
                f"<tr><td>{esc(col)}</td><td>{_fmt(e['value'], '.4g')}</td><td>{_fmt(e['rank'], '.0f')}</td>"
                f"<td>{_fmt(e['percentile'], '.1f')}</td><td><code>{esc(str(e['run']))}</code></td></tr>"
                for col, e in card["scores"].items())
            roles = ", ".join(esc(r) for r in card["roles"]) or "no role"
            rows += "".join(f"<tr><td>{esc(col)}</td><td>{esc(str(v))}</td><td></td><td></td>"
                            f"<td><code>{esc(str(self.runs[self._scored_by[col]]))}</code></td></tr>"
                            for col, v in card["labels"].items())
            cards.append(f'<section class="card" id="head-{label}"><h3>head {label} '
                         f'<small>(KV head {card["kv_head"]})</small></h3><p class="roles">roles: {roles}</p>'
                         "<table><tr><th>score</th><th>value</th><th>rank</th><th>percentile</th><th>run</th></tr>"
                         f"{rows}</table></section>")
        page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em;}} .card{{border:1px solid #ccc;border-radius:4px;padding:.4em .8em;
margin:.6em 0;}} .card h3{{margin:.2em 0;}} table{{border-collapse:collapse;font-size:90%;}}
td,th{{padding:1px 8px;text-align:left;border-bottom:1px solid #eee;}} #search{{font-size:110%;width:24em;}}</style>
</head><body><h1>{esc(title)}</h1>
<p>{len(self.heads)} heads, {len(self.scores)} scores, {len(self.rules)} roles: {esc(", ".join(self.role_names))}.
A head is written layer-head: <code>12-3</code> is layer 12, head 3.</p>
<h2>Runs</h2><ul>{runs}</ul>
<h2>Roles by head</h2>{grid}
<h2>Role overlaps</h2>{matrix}
<h2>Heads</h2>
<p><input id="search" type="search" placeholder="filter: a head (12-3), a role, a score"></p>
<div id="cards">{"".join(cards)}</div>
<script>document.getElementById("search").addEventListener("input", function (e) {{
  var q = e.target.value.trim().toLowerCase();
  document.querySelectorAll("#cards .card").forEach(function (c) {{
    var exact = /^\\d+-\\d+$/.test(q);
    c.style.display = !q || (exact ? c.id === "head-" + q : c.textContent.toLowerCase().indexOf(q) >= 0) ? "" : "none";
  }});
}});</script>
</body></html>
"""
        write_text(path, page)
        return path


def atlas(model, preset: str | dict = "quick", store=None, progress=False, *,
          analyses: Iterable[str] | None = None, cluster: str | Cluster | Workers | None = None) -> Atlas:
    """Score `model` (an `interp.Model` or anything `load_model` takes) with every analysis that applies to its family
    (each analysis's `kinds` / `check`), one ordinary run per analysis in `store` (a directory or Store; None: the
    default store) with the preset's settings, reusing a complete run with the same settings (`completed_run`: no
    rescoring), and return the `Atlas` of those runs.

    preset: "quick" or "full" (see `PRESETS`), or a dict {analysis: {option or parameter: value}} (an analysis it
    does not name runs with its defaults). analyses: only these (default: all of `interp.analyses.ANALYSES`).
    progress: as `score`'s. cluster: as `score`'s (an address, an `interp.cluster.Cluster` or started `Workers`):
    every run's samples (and finalize's heavy loops) on Ray workers, one run after another, each analysis on its own
    (no shared forward pass: the workers spread the samples instead); Workers started here stop on return. The
    atlas's `skipped` says, per analysis left out, why: it does not apply to the model's family, or its run failed
    (e.g. circuits' tasks need names the tokenizer keeps as one token). The atlas is saved in the store as one entry
    naming its runs (`save_atlas`; its id is the returned Atlas's `id`). ValueError when no analysis gives a run.
    """
    settings = PRESETS.get(preset) if isinstance(preset, str) else preset
    if settings is None:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)} (or give a dict)")
    names = list(ANALYSES) if analyses is None else list(analyses)
    unknown = [n for n in names if n not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown[0]!r}; choose from {', '.join(ANALYSES)}")
    spec = as_cluster(cluster, model)
    if isinstance(spec, Cluster):  # started here, for every run, and stopped on return
        if isinstance(model, (str, os.PathLike)):
            model = spec.driver_model(str(model))  # the workers hold the weights
        with Workers(spec, model) as workers:
            return atlas(model, preset, store, progress, analyses=analyses, cluster=workers)
    model, runs, bars = open_work(model, store, progress)
    ids, skipped, shared = {}, {}, {}

    def alone(name: str, options: dict, params: dict) -> None:
        """One analysis in its own run (its failure recorded in `skipped`)."""
        row = {"model": model.name, "analysis": name, "params": params, "status": "done", "run": None,
               "samples": None, "seconds": 0.0, "error": None}
        score_combination(row, model, options, runs, spec, bars, wait=True)  # claims, reuses a complete run, or scores
        if row["status"] == "failed":
            skipped[name] = row["error"]
            ids.pop(name, None)
        else:
            ids[name] = row["run"]

    for name in names:
        an = ANALYSES[name]
        try:
            an.check(model)  # its family kinds, and whatever else the analysis needs of the model
        except ValueError as e:  # NotApplicableError included
            skipped[name] = str(e)
            continue
        chosen = dict(settings.get(name, {}))
        options = {k: chosen.pop(k) for k in OPTION_KEYS if k in chosen}
        if spec is None and hasattr(an, "sample_pass"):  # scored below with the others that can share a forward pass
            ids[name], shared[name] = None, (options, chosen)
        else:
            alone(name, options, chosen)
    if shared:
        try:  # one run each, one forward pass for the samples whose inputs coincide
            ids.update(zip(shared, score_together(model, [(n, o, p) for n, (o, p) in shared.items()], runs, bars)))
        except (ValueError, RuntimeError, OSError):  # one of them cannot run: each on its own, its error recorded
            for name, (options, chosen) in shared.items():
                alone(name, options, chosen)
    if not ids:
        reasons = "; ".join(f"{n}: {why}" for n, why in skipped.items())
        raise ValueError(f"no analysis gave a run of {model.name} for an atlas ({reasons or 'none chosen'})")
    result = Atlas(open_run(run, runs) for run in ids.values())
    result.skipped, result.preset = skipped, preset
    save_atlas(result, runs)
    return result


def save_atlas(atlas: Atlas, store=None) -> str:
    """Record `atlas` in `store` (None: the default store) as one entry naming its runs, and return its id (also set
    as `atlas.id`). The entry is a store directory like a run's (`interp runs` lists it, analysis "atlas"): meta.json
    holds the runs, the analyses skipped with why, the preset and every role's rule; heads.parquet is
    `Atlas.table()`; overlaps / correlations / layer_profiles.parquet the rest. An entry of the same model with the
    same runs and skips is reused, not written twice."""
    runs = as_store(store)
    for info in runs.runs():
        m = info.meta or {}
        if (info.status == "complete" and is_atlas(m) and m["model"]["name"] == atlas.model
                and m.get("runs") == atlas.runs and m.get("skipped") == atlas.skipped):
            atlas.id = info.id
            return info.id
    meta = {"kind": "atlas", "analysis": "atlas", "model": atlas.identity,
            "options": {"preset": atlas.preset}, "params": {}, "plan": [],
            "runs": dict(atlas.runs), "skipped": dict(atlas.skipped),
            "scores": {col: f"{col} from run {atlas.runs[atlas._scored_by[col]]}" for col in atlas.scores},
            "roles": {name: {k: v for k, v in asdict(role).items() if v is not None}
                      for name, role in atlas.rules.items()}}
    writer = runs.create(meta, f"atlas-{run_slug(atlas.model)}")
    try:
        tables = {"overlaps": atlas.overlaps(), "correlations": atlas.correlations().rename_axis("score").reset_index(),
                  "layer_profiles": atlas.layer_profiles().reset_index()}
        writer.finish(atlas.table(), pd.DataFrame({"sample": pd.Series(dtype=int)}), tables, atlas.summary_lines())
    except BaseException:
        writer.discard()
        raise
    atlas.id = writer.id
    return writer.id


def open_atlas(atlas: str | os.PathLike, store=None) -> Atlas:
    """A stored atlas (an id, a unique id prefix or its directory), rebuilt from the runs it names (in the store that
    holds it). ValueError when the entry is a run, not an atlas; RunNotFoundError when a run it names is gone."""
    path = as_store(store).find(atlas)
    meta = read_meta(path)
    if not is_atlas(meta):
        raise ValueError(f"{path.name} is a {meta['analysis']} run, not an atlas (see `interp runs`: atlases have "
                         "analysis 'atlas')")
    opened = Atlas.open(meta["runs"].values(), path.parent)
    opened.skipped, opened.id, opened.preset = dict(meta.get("skipped", {})), meta["id"], meta["options"].get("preset")
    return opened


def compare_atlases(a: Atlas, b: Atlas, n_permutations: int = 2000, seed: int = 0) -> pd.DataFrame:
    """The roles of two atlases side by side, one row per role either has (A's roles first, in order).

    Where both atlases score the same heads (the same layers × heads: an LLM and the LVLM built on it), heads are
    matched by layer and head (`match` "layer-head"): `n_a`, `n_b`, `both` over the heads both roles' scores cover,
    their Jaccard, its chance `expected` and p-values as `Atlas.overlaps` computes them, and the heads `only_a`
    (lost in B) and `only_b` (gained in B) in L-H notation. Otherwise (`match` "relative depth") layer l of a model
    with L layers sits at depth l / (L − 1): `profile_corr` is the Pearson correlation of the role's per-layer
    fraction in A with B's, interpolated at A's depths. Both: `depth_a`, `depth_b`, the role's heads' mean relative
    depth. A role only one atlas has: `match` "only in A" / "only in B"."""
    same = (a.heads[KEYS].sort_values(KEYS).to_numpy().tolist() == b.heads[KEYS].sort_values(KEYS).to_numpy().tolist())
    rows = []
    for role in [*a.role_names, *(r for r in b.role_names if r not in a.rules)]:
        row = {"role": role, "match": "layer-head" if same else "relative depth",
               "depth_a": _mean_depth(a, role), "depth_b": _mean_depth(b, role)}
        if role not in b.rules or role not in a.rules:
            row["match"] = "only in A" if role in a.rules else "only in B"
        elif same:
            ta = a.roles.assign(scored=a._scored(role)).set_index(KEYS)
            tb = b.roles.assign(scored=b._scored(role)).set_index(KEYS).loc[ta.index]
            keep = (ta["scored"] & tb["scored"]).to_numpy()
            x, y = ta[role].to_numpy()[keep], tb[role].to_numpy()[keep]
            heads = ta.index[keep]
            row |= _overlap(x, y, n_permutations, seed)
            row["only_a"] = ", ".join(f"{l}-{h}" for (l, h), i, j in zip(heads, x, y) if i and not j)
            row["only_b"] = ", ".join(f"{l}-{h}" for (l, h), i, j in zip(heads, x, y) if j and not i)
        else:
            fa, fb = a.layer_profiles()[role], b.layer_profiles()[role]
            da, db = _depths(fa.index), _depths(fb.index)
            ok = fb.notna().to_numpy()
            at_a = np.interp(da, db[ok], fb.to_numpy()[ok]) if ok.any() else np.full(len(da), np.nan)
            row["profile_corr"] = _pearson(fa.to_numpy(float), at_a)
        rows.append(row)
    columns = ["role", "match", "n", "n_a", "n_b", "both", "jaccard", "expected", "p_value", "p_exact", "only_a",
               "only_b", "depth_a", "depth_b", "profile_corr"]
    return pd.DataFrame(rows, columns=columns)


def _depths(layers) -> np.ndarray:
    """Relative depth of each layer index, l / (L − 1) with L = the largest index + 1 (0 for a single layer)."""
    layers = np.asarray(layers, float)
    top = layers.max() if len(layers) else 0.0
    return layers / top if top > 0 else np.zeros_like(layers)


def _mean_depth(atlas: Atlas, role: str) -> float:
    """The mean relative depth of the heads with `role` (NaN when none or the atlas lacks the role)."""
    if role not in atlas.rules or not atlas.roles[role].any():
        return np.nan
    depth = _depths(atlas.heads["layer"])  # the atlas's layers: 0 .. its deepest scored layer
    return float(depth[atlas.roles[role].to_numpy()].mean())


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 2 or x[ok].std() == 0 or y[ok].std() == 0:
        return np.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _overlap(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> dict:
    """The overlap statistics of two (N,) boolean memberships (see `Atlas.overlaps`)."""
    n, n_a, n_b, both = len(a), int(a.sum()), int(b.sum()), int((a & b).sum())
    out = {"n": n, "n_a": n_a, "n_b": n_b, "both": both}
    if n_a + n_b == 0:
        return out | {"jaccard": np.nan, "expected": np.nan, "p_value": np.nan, "p_exact": np.nan}
    jaccard = both / (n_a + n_b - both)
    total = math.comb(n, n_a)
    xs = range(max(0, n_a + n_b - n), min(n_a, n_b) + 1)
    pmf = {x: math.comb(n_b, x) * math.comb(n - n_b, n_a - x) / total for x in xs}
    expected = sum(p * x / (n_a + n_b - x) for x, p in pmf.items())
    p_exact = min(1.0, sum(p for x, p in pmf.items() if x >= both))
    rng, hits, done = np.random.default_rng(seed), 0, 0
    while done < n_permutations:
        chunk = min(256, n_permutations - done)
        shuffled = b[np.argsort(rng.random((chunk, n)), axis=1)]              # (chunk, N)
        inter = (shuffled & a).sum(1)
        hits += int((inter >= both).sum())  # J_perm ≥ J exactly when |A ∩ B_perm| ≥ |A ∩ B| (sizes fixed)
        done += chunk
    p_value = (1 + hits) / (1 + n_permutations)
    return out | {"jaccard": jaccard, "expected": expected, "p_value": p_value, "p_exact": p_exact}


def _fmt(v: float | None, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _num(v) -> float | None:
    return None if pd.isna(v) else float(v)

