"""Circuits of tasks and their overlap (REFERENCES.md §4): which heads a task's logit difference runs through.

Per task (IOI, Colored Objects, a JSONL file; `analyses.tasks`), each head's effect on the logit difference
(logit[correct] − logit[foil] at the last position) when its output is taken from the corrupted prompt into the clean
run, normalised as (patched − clean) / (corrupt − clean) (1: the head carries the whole corruption):
- `patching`: activation patching of the head's output at every position (one forward per head);
- `eap` / `eap_ig`: edge attribution patching, its linear estimate (one forward / backward per batch; EAP-IG
  averages the gradient along the embeddings from the clean to the corrupted prompt);
- `path`: path patching from the head to the logits (its direct effect; every other head frozen to the clean run,
  MLPs recomputed).
Ratios of means: sums over all prompts, divided once. The circuit is the top `circuit_percent` % of heads by
|effect| (or |effect| ≥ `circuit_threshold`); faithfulness is the logit difference left when every head outside it is
mean-ablated (means of the task's corrupted prompts at each position, as Wang et al.). Overlap of two tasks' circuits:
shared heads, Jaccard, overlap of the smaller, and Spearman's ρ of the full |effect| vectors.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interp.app.figures import DIVERGING, TEMPLATE, Note, text_table
from interp.compare import head_label, overlap_of, rank_correlation
from interp.fanout import fan_out
from interp.hooks.patching import activation_patch, cache_run, edge_attribution, last_logits, patch_heads, path_patch
from interp.models import Model
from interp.params import BATCH, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .tasks import BUILTIN_TASKS, IOI_CORRUPTIONS, TaskPrompt, encode, task_label, task_prompts

METHODS = ("patching", "eap", "eap-ig", "path")
METHOD_TEXT = {
    "patching": "activation patching of the head's output (all positions)",
    "eap": "edge attribution patching (linear estimate of patching)",
    "eap_ig": "EAP-IG (integrated gradients along the embeddings)",
    "path": "path patching to the logits (direct effect)",
}
DEFAULT_PROMPTS = 32


def _list(value, name: str) -> list[str]:
    """The items of a list parameter (older runs stored some as comma-separated text)."""
    items = [s.strip() for s in (value.split(",") if isinstance(value, str) else value) if str(s).strip()]
    if not items:
        raise ValueError(f"circuits parameter {name}: give at least one")
    return items


def tasks_of(params: dict) -> list[str]:
    """The tasks of a run's parameters (built-in names or paths of JSONL files), validated."""
    tasks = _list(params["tasks"], "tasks")
    labels = [task_label(t) for t in tasks]
    if len(set(labels)) < len(labels):
        raise ValueError(f"circuits parameter tasks: {', '.join(tasks)} repeat a name")
    return tasks


def methods_of(params: dict) -> list[str]:
    methods = _list(params["methods"], "methods")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"circuits parameter methods: unknown circuit method {', '.join(unknown)!r:.80}; choose from "
                         f"{', '.join(METHODS)}")
    return [m for m in METHODS if m in methods]


def column(task: str, method: str) -> str:
    """The heads-table column of a task's effect by a method, e.g. `ioi_patching`, `colored_objects_eap_ig`."""
    return f"{task_label(task)}_{method.replace('-', '_')}"


def circuit_column(params: dict, task: str) -> str:
    """The column that chooses a task's circuit: `circuit_by` (default: patching when computed, else the first)."""
    methods = methods_of(params)
    by = params.get("circuit_by") or ("patching" if "patching" in methods else methods[0])
    if by not in methods:
        raise ValueError(f"circuits parameter circuit_by: {by!r} is not among the computed methods "
                         f"{', '.join(methods)}")
    return column(task, by)


def logit_diff(last: torch.Tensor, correct: torch.Tensor, foil: torch.Tensor) -> torch.Tensor:
    """logit[correct] − logit[foil]: the last position's logits (B, V), correct / foil (B,) -> (B,)."""
    last = last.to(torch.promote_types(last.dtype, torch.float32))
    return last.gather(1, correct[:, None])[:, 0] - last.gather(1, foil[:, None])[:, 0]


class TaskBatch:
    """One planned sample's prompts (a dict with "task" and "prompts", as in a circuits run's plan) as tensors on
    the model's device: clean / corrupt inputs (B, N), correct / foil (B,), and `metric`, the logit difference."""

    def __init__(self, model: Model, sample: dict):
        self.prompts = [TaskPrompt(**p) for p in sample["prompts"]]
        enc = encode(model, self.prompts, sample["task"])
        dev = model.device
        ids = torch.tensor(enc.clean, device=dev)
        self.clean = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.corrupt = {"input_ids": torch.tensor(enc.corrupt, device=dev), "attention_mask": torch.ones_like(ids)}
        self.correct = torch.tensor(enc.correct, device=dev)
        self.foil = torch.tensor(enc.foil, device=dev)

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The logit difference of each row of last-position logits (R, V), R a multiple of B (copies of the batch)."""
        copies = logits.shape[0] // len(self.correct)
        return logit_diff(logits, self.correct.repeat(copies), self.foil.repeat(copies))


@dataclass(frozen=True)
class CircuitsParams(Params):
    analysis = "circuits"
    tasks: list[str] = param(BUILTIN_TASKS, f"tasks, comma-separated: {', '.join(BUILTIN_TASKS)} and/or .jsonl "
                             "files of prompts", metavar="T,T", path=True, builtin=BUILTIN_TASKS)
    methods: str = param("patching,eap", f"methods, comma-separated, of {', '.join(METHODS)}", metavar="M,M")
    ioi_corruption: str = param("abc", "abc (three other names) or swap (the IO name at S2)", metavar="HOW",
                                choices=IOI_CORRUPTIONS)
    batch: int = param(16, BATCH)
    circuit_percent: float | None = param(2.0, "the circuit is the top P % of heads by |effect|", metavar="P")
    circuit_threshold: float | None = param(None, "the circuit is every head with |effect| >= X (instead of "
                                            "circuit_percent)", metavar="X", low=0, was="threshold")
    circuit_by: str | None = param(None, "the method whose effect chooses the circuit (default: patching when "
                                   "computed)", metavar="M")
    ig_steps: int = param(5, "EAP-IG interpolation steps", metavar="N", low=1)
    per_position: bool = param(False, "also patch each head at each position")
    faithfulness_percents: str = param("1,2,5,10,20,50", "circuit sizes (% of heads), comma-separated, whose "
                                       "faithfulness is measured too", metavar="P,P")

    def __post_init__(self):
        params = self.__dict__
        for task in tasks_of(params):
            circuit_column(params, task)  # a circuit_by among the methods
        _percents(params)
        if self.circuit_percent is not None and not 0 < self.circuit_percent <= 100:
            raise ValueError(f"circuits parameter circuit_percent must be in (0, 100], got {self.circuit_percent}")


class Circuits(Analysis):
    name = "circuits"
    description = ("task circuits (IOI, Colored Objects, a JSONL task): per-head activation patching, path patching "
                   "and edge attribution patching of the logit difference; circuits, faithfulness and overlap")
    kinds = ("llm", "lvlm")
    scores: ClassVar[dict[str, str]] = {}
    Params = CircuitsParams
    describe = ("task", "n", "clean_ld", "corrupt_ld")

    def sample_column(self, score: str) -> str:
        """`ioi_patching` -> `patching`: the per-sample change of the logit difference by that method."""
        return next((m for m in ("eap_ig", "patching", "eap", "path") if score.endswith("_" + m)), score)
    sample_tables = ("prompts", "positions")
    signed = True
    # one role per task, named circuit_<task>, on the column that chooses its circuit (see roles_of): this is its form
    roles = (Role("circuit", "<task>_<circuit_by>", rule="top", fraction=0.02, sign=0,
                  description="circuit member: the run's circuit rule (`circuit_heads`) — |effect| ≥ circuit_threshold "
                              "when given, else the top circuit_percent % of heads by |effect| (at least one)"),)

    def roles_of(self, params: dict, columns) -> tuple[Role, ...]:
        """`circuit_<task>` for every task of the run: its circuit as `circuit_heads` chooses it."""
        form, out = self.roles[0], []
        for task in tasks_of(params):
            col = circuit_column(params, task)
            if col not in columns:
                continue
            if params.get("circuit_threshold") is not None:
                rule = dict(rule="threshold", threshold=float(params["circuit_threshold"]), inclusive=True)
            else:
                rule = dict(rule="top", fraction=float(params["circuit_percent"]) / 100)
            out.append(replace(form, name=f"circuit_{task_label(task)}", score=col, **rule))
        return tuple(out)

    def score_columns(self, model: Model, params: dict) -> dict[str, str]:
        return {column(t, m): f"{t}: {METHOD_TEXT[m.replace('-', '_')]}, normalised (patched − clean)/(corrupt − clean)"
                for t in tasks_of(params) for m in methods_of(params)}

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        if options.backend != "hf":
            raise ValueError("circuits patches heads through the 'hf' backend (the attention interface); "
                             f"backend {options.backend!r} cannot patch")
        plan = []
        for task in tasks_of(params):
            prompts = task_prompts(model, task, options.samples or DEFAULT_PROMPTS, options.seed,
                                   params["ioi_corruption"])
            lengths = [len(ids) for ids in encode(model, prompts, task).clean]  # checks every prompt now
            groups: dict[str, list[TaskPrompt]] = defaultdict(list)
            for p, n in zip(prompts, lengths):
                groups[f"{p.group}:{n}"].append(p)
            for key, members in groups.items():
                for start in range(0, len(members), int(params["batch"])):
                    chunk = members[start:start + int(params["batch"])]
                    plan.append({"task": task, "group": key, "prompts": [p.to_json() for p in chunk]})
        return plan

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        """The sample's first clean prompt (what the dashboard's attention view shows)."""
        return {k: v[:1] for k, v in TaskBatch(model, sample).clean.items()}

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> dict[str, pd.DataFrame]:
        methods = methods_of(params)
        batch = TaskBatch(model, sample)
        clean = cache_run(model, batch.clean)
        corrupt = cache_run(model, batch.corrupt)
        with torch.no_grad():  # the baseline from the same last-position unembedding as the patched runs
            ld_clean = batch.metric(last_logits(model, batch.clean))
        ld_corrupt = batch.metric(corrupt.logits[:, -1])
        n_heads, n_kv = model.head_counts()
        layers = list(options.layers) if options.layers is not None else sorted(clean.z)
        heads = list(options.heads) if options.heads is not None else list(range(n_heads))
        b, n = batch.clean["input_ids"].shape
        columns: dict[str, np.ndarray] = {}                                                   # each (layers, heads)
        if "patching" in methods:
            variants = [(layer, h, None) for layer in layers for h in heads]
            lds = activation_patch(model, batch.clean, corrupt, variants, batch.metric)
            columns["patching"] = (lds.mean(1) - ld_clean.mean()).reshape(len(layers), len(heads)).cpu().numpy()
        eap = edge_attribution(model, batch.clean, batch.corrupt, batch.metric, clean_cache=clean,
                               corrupt_cache=corrupt)[layers][..., heads]                     # (layers, B, N, heads)
        if "eap" in methods:
            columns["eap"] = eap.sum(2).mean(1).cpu().numpy()
        if "eap-ig" in methods:
            ig = edge_attribution(model, batch.clean, batch.corrupt, batch.metric, clean_cache=clean,
                                  corrupt_cache=corrupt, ig_steps=int(params["ig_steps"]))[layers][..., heads]
            columns["eap_ig"] = ig.sum(2).mean(1).cpu().numpy()
        if "path" in methods:
            columns["path"] = np.array([[float(batch.metric(path_patch(
                model, batch.clean, [(layer, h)], clean_cache=clean, corrupt_cache=corrupt)[:, -1]).mean()
                - ld_clean.mean()) for h in heads] for layer in layers])
        group = n_heads // n_kv
        label = task_label(sample["task"])
        rows = pd.concat([head_rows(layer, heads, [h // group for h in heads], task=label, n=b,
                                    clean_ld=float(ld_clean.mean()), corrupt_ld=float(ld_corrupt.mean()),
                                    **{m: columns[m][i] for m in columns})
                          for i, layer in enumerate(layers)], ignore_index=True)
        tokens = model.tokenizer.convert_ids_to_tokens(batch.clean["input_ids"][0].tolist())
        positions = {"eap": eap.mean(1).permute(0, 2, 1).reshape(-1).cpu().numpy()}               # (L, H, N)
        if params["per_position"]:
            variants = [(layer, h, p) for layer in layers for h in heads for p in range(n)]
            lds = activation_patch(model, batch.clean, corrupt, variants, batch.metric)
            positions["patching"] = (lds.mean(1) - ld_clean.mean()).cpu().numpy()
        grid = pd.MultiIndex.from_product([layers, heads, range(n)], names=["layer", "head", "position"]).to_frame(index=False)
        grid.insert(2, "kv_head", grid["head"] // group)
        grid["token"] = [tokens[p] for p in grid["position"]]
        for name, values in positions.items():
            grid[name] = values
        grid.insert(0, "task", label)
        top1_clean = clean.logits[:, -1].argmax(-1) == batch.correct
        top1_corrupt = corrupt.logits[:, -1].argmax(-1) == batch.correct
        prompts = pd.DataFrame({"task": label, "group": sample["group"], "prompt": range(b),
                                "clean": [p.clean for p in batch.prompts], "corrupt": [p.corrupt for p in batch.prompts],
                                "correct": [p.correct for p in batch.prompts], "foil": [p.foil for p in batch.prompts],
                                "clean_ld": ld_clean.cpu().numpy(), "corrupt_ld": ld_corrupt.cpu().numpy(),
                                "clean_top1": top1_clean.cpu().numpy(), "corrupt_top1": top1_corrupt.cpu().numpy()})
        return {"samples": rows, "prompts": prompts, "positions": grid}

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        methods = [m.replace("-", "_") for m in methods_of(params)]
        out = None
        for task in tasks_of(params):
            rows = samples[samples["task"] == task_label(task)]
            if rows.empty:
                continue
            weighted = rows[methods + ["clean_ld", "corrupt_ld"]].mul(rows["n"], axis=0)
            sums = weighted.groupby([rows["layer"], rows["head"], rows["kv_head"]]).sum()
            effects = sums[methods].div(sums["corrupt_ld"] - sums["clean_ld"], axis=0)
            effects.columns = [column(task, m) for m in methods]
            out = effects if out is None else out.join(effects, how="outer")
        if out is None:
            raise ValueError("no finished sample of any task to aggregate")
        return out.reset_index()

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        tasks = tasks_of(params)
        circuits = {task_label(t): circuit_heads(heads, circuit_column(params, t), params) for t in tasks}
        circuit_table = pd.concat([pd.DataFrame({"task": t, "rank": range(1, len(c) + 1),
                                                 "layer": [h[0] for h in c], "head": [h[1] for h in c]})
                                   for t, c in circuits.items()], ignore_index=True)
        circuit_table = circuit_table.merge(heads, on=["layer", "head"], how="left")
        faith = pd.concat([faithfulness(model, task_label(t), [s for s in plan if s["task"] == t], heads,
                                        circuit_column(params, t), circuits[task_label(t)], params, progress)
                           for t in tasks], ignore_index=True)
        labels = list(circuits)
        overlap = pd.DataFrame([overlap_row(heads, params, a, b, circuits) for i, a in enumerate(labels)
                                for b in labels[i + 1:]],
                               columns=["task_a", "task_b", "heads_a", "heads_b", "shared", "jaccard", "of_smaller",
                                        "rank_correlation", "shared_heads", "only_a", "only_b"])
        return {"circuit": circuit_table, "faithfulness": faith, "overlap": overlap,
                "agreement": agreement(heads, params, circuits),
                "warnings": task_warnings(extras.get("prompts"), faith)}

    def report(self, result) -> list[str]:
        lines = []
        prompts = result.tables.get("prompts")
        faith = result.tables.get("faithfulness")
        warnings = task_warnings(prompts, faith)
        for task in map(task_label, tasks_of(self.stored_params(result.meta))):
            lines += [f"warning: {w}" for w in warnings[warnings["task"] == task]["warning"]]
            if prompts is not None:
                p = prompts[prompts["task"] == task]
                lines.append(f"{task}: {len(p)} prompts, logit difference clean {p['clean_ld'].mean():.2f}, corrupt "
                             f"{p['corrupt_ld'].mean():.2f}; correct > foil on {100 * (p['clean_ld'] > 0).mean():.0f} %, "
                             f"top-1 on {100 * p['clean_top1'].mean():.0f} %")
            circuit = result.tables["circuit"]
            heads = circuit[circuit["task"] == task]
            lines.append(f"  circuit ({len(heads)} heads, by {circuit_column(self.stored_params(result.meta), task)}): "
                         + ", ".join(head_label(r.layer, r.head) for r in heads.itertuples()))
            if faith is not None:
                f = faith[(faith["task"] == task) & faith["circuit"]]
                for r in f.itertuples():
                    lines.append(f"  faithfulness: {100 * r.recovered:.0f} % of the logit difference kept with the "
                                 f"{r.heads} circuit heads alone (the rest mean-ablated; all ablated: {r.ablated_ld:.2f})")
        for r in result.tables.get("overlap", pd.DataFrame()).itertuples():
            lines.append(f"overlap {r.task_a} / {r.task_b}: {r.shared} shared of {r.heads_a} / {r.heads_b} heads "
                         f"(Jaccard {r.jaccard:.2f}, of the smaller {100 * r.of_smaller:.0f} %), Spearman ρ of all "
                         f"heads {r.rank_correlation:.2f}")
        for r in result.tables.get("agreement", pd.DataFrame()).itertuples():
            lines.append(f"{r.task}: {r.method} vs {r.reference}: Spearman ρ {r.rank_correlation:.2f} (|effect|), "
                         f"top-{r.k} shared {r.shared}")
        return lines

    def view(self, result) -> list:
        """Each task's circuit and faithfulness curve, the overlap of every two tasks (with a link to compare them),
        how the methods agree, and the circuit heads' effect at each position of a sample of each task."""
        t, params = result.tables, self.stored_params(result.meta)
        tasks = [task_label(task) for task in tasks_of(params)]
        out: list = []
        warnings = task_warnings(t.get("prompts"), t.get("faithfulness"))
        for task in tasks:
            out += [Note(f"⚠ warning: {w}") for w in warnings[warnings["task"] == task]["warning"]]
            heads = t["circuit"][t["circuit"]["task"] == task]
            text = ", ".join(head_label(r.layer, r.head) for r in heads.itertuples()) or "none"
            out.append(Note(f"{task}: circuit of {len(heads)} heads by {circuit_column(params, task)}: {text}"))
            if "prompts" in t:
                p = t["prompts"][t["prompts"]["task"] == task]
                shown = p[["clean", "correct", "foil", "clean_ld", "clean_top1"]].rename(columns={
                    "clean": "prompt", "correct": "expected", "clean_ld": "logit diff", "clean_top1": "top-1"})
                out.append(text_table(shown, f"{task}: {len(p)} prompts"))
        for r in t.get("overlap", pd.DataFrame()).itertuples():
            link = (f"/compare?a={result.id}&b={result.id}&sa={circuit_column(params, r.task_a)}"
                    f"&sb={circuit_column(params, r.task_b)}&k={max(r.heads_a, r.heads_b)}&abs=1")
            out.append(Note(f"overlap {r.task_a} / {r.task_b}: {r.shared} heads shared ({r.shared_heads or 'none'}) · "
                            f"Jaccard {r.jaccard:.2f} · of the smaller {r.of_smaller:.2f} · Spearman ρ of all heads "
                            f"{r.rank_correlation:.2f} · ", link=("compare them", link)))
        for r in t.get("agreement", pd.DataFrame()).itertuples():
            out.append(Note(f"{r.task}: {r.method} vs {r.reference}: Spearman ρ {r.rank_correlation:.2f} of |effect|, "
                            f"{r.shared} of the top {r.k} shared"))
        if "faithfulness" in t:
            out.append(faithfulness_curves(t["faithfulness"]))
        if "positions" in t:
            for task in tasks:
                heads = t["circuit"][t["circuit"]["task"] == task]
                first = t["positions"][t["positions"]["task"] == task]["sample"].min()
                if len(heads) and pd.notna(first):
                    out.append(position_effects(t["positions"], int(first), list(zip(heads["layer"], heads["head"]))))
        return out



CLEAN_LD_FLOOR = 1.0  # a task the model does: its clean logit difference (correct − foil) is at least this
FAITHFUL_RANGE = (0.0, 1.5)  # a circuit's faithfulness (share of the clean logit difference kept) that means something


def task_warnings(prompts: pd.DataFrame | None, faith: pd.DataFrame | None) -> pd.DataFrame:
    """Tasks whose circuit means little (`task`, `warning`): the model does not do the task (mean clean logit
    difference below CLEAN_LD_FLOOR), or the circuit's faithfulness lies outside FAITHFUL_RANGE (a ratio of a logit
    difference near 0, or a circuit that flips the answer)."""
    rows = []
    if prompts is not None:
        for task, p in prompts.groupby("task", sort=False):
            ld = p["clean_ld"].mean()
            if ld < CLEAN_LD_FLOOR:
                rows.append({"task": task, "warning": (
                    f"the model does not do {task}: clean logit difference {ld:.2f} (below {CLEAN_LD_FLOOR:g}), "
                    f"correct > foil on {100 * (p['clean_ld'] > 0).mean():.0f} % of {len(p)} prompts; its circuit and "
                    "faithfulness mean little")})
    if faith is not None:
        lo, hi = FAITHFUL_RANGE
        for r in faith[faith["circuit"].astype(bool)].itertuples():
            if not lo <= r.recovered <= hi:
                rows.append({"task": r.task, "warning": (
                    f"{r.task}: faithfulness {100 * r.recovered:.0f} % lies outside {100 * lo:.0f}–{100 * hi:.0f} % "
                    f"(circuit logit difference {r.ld:.2f} against {r.clean_ld:.2f} clean): the circuit does not "
                    "account for the task")})
    return pd.DataFrame(rows, columns=["task", "warning"])


def _importance(heads: pd.DataFrame, col: str) -> pd.DataFrame:
    return heads[["layer", "head"]].assign(importance=heads[col].abs())


def circuit_heads(heads: pd.DataFrame, col: str, params: dict) -> list[tuple[int, int]]:
    """A task's circuit, most important first: heads with |effect| ≥ threshold, else the top circuit_percent %
    (at least one head)."""
    ranked = _importance(heads, col).dropna().sort_values("importance", ascending=False, kind="stable")
    if params.get("circuit_threshold") is not None:
        ranked = ranked[ranked["importance"] >= float(params["circuit_threshold"])]
    else:
        ranked = ranked.head(max(1, round(float(params["circuit_percent"]) / 100 * len(heads))))
    return [(int(r.layer), int(r.head)) for r in ranked.itertuples()]


def overlap_row(heads: pd.DataFrame, params: dict, a: str, b: str, circuits: dict) -> dict:
    ov = overlap_of(circuits[a], circuits[b])
    rho = rank_correlation(_importance(heads, circuit_column(params, a)), "importance",
                           _importance(heads, circuit_column(params, b)), "importance")
    fmt = lambda hs: " ".join(head_label(layer, head) for layer, head in hs)  # noqa: E731
    return {"task_a": a, "task_b": b, "heads_a": len(ov.top_a), "heads_b": len(ov.top_b), "shared": len(ov.shared),
            "jaccard": ov.jaccard, "of_smaller": ov.of_smaller, "rank_correlation": rho,
            "shared_heads": fmt(ov.shared), "only_a": fmt(ov.only_a), "only_b": fmt(ov.only_b)}


def agreement(heads: pd.DataFrame, params: dict, circuits: dict) -> pd.DataFrame:
    """How every other method ranks the heads against the one that chooses the circuit: Spearman's ρ of |effect|
    and the shared heads of the top k (k = the circuit's size)."""
    rows = []
    for task, circuit in circuits.items():
        ref = circuit_column(params, task)
        for m in methods_of(params):
            col = column(task, m)
            if col == ref:
                continue
            k = len(circuit)
            mine = _importance(heads, col).sort_values("importance", ascending=False, kind="stable").head(k)
            shared = len({(int(r.layer), int(r.head)) for r in mine.itertuples()} & set(circuit))
            rows.append({"task": task, "method": col, "reference": ref,
                         "rank_correlation": rank_correlation(_importance(heads, col), "importance",
                                                              _importance(heads, ref), "importance"),
                         "signed_correlation": rank_correlation(heads, col, heads, ref), "k": k, "shared": shared})
    return pd.DataFrame(rows, columns=["task", "method", "reference", "rank_correlation", "signed_correlation", "k",
                                       "shared"])


def _percents(params: dict) -> list[float]:
    given = params.get("faithfulness_percents") or []
    given = [given] if isinstance(given, (int, float)) else given
    try:
        values = [float(x) for x in (given.split(",") if isinstance(given, str) else given) if str(x).strip()]
    except ValueError:
        raise ValueError(f"circuits parameter faithfulness_percents: give comma-separated percents, not "
                         f"{given!r}") from None
    if any(not 0 < v <= 100 for v in values):
        raise ValueError(f"circuits parameter faithfulness_percents must lie in (0, 100], got {given!r}")
    return sorted(set(values))


def faithfulness(model: Model, task: str, plan: list[dict], heads: pd.DataFrame, col: str, circuit: list[tuple[int, int]],
                 params: dict, progress: Progress) -> pd.DataFrame:
    """Logit difference with every head outside a circuit mean-ablated, for the chosen circuit and the top P % of
    heads for each of `faithfulness_percents` (and 0 heads: all ablated). Means: the task's corrupted prompts of the
    same group (aligned positions), per position. recovered = LD / clean LD (Wang et al.'s F(C) / F(M));
    normalised = (LD − all-ablated LD) / (clean LD − all-ablated LD)."""
    ranked = [(int(r.layer), int(r.head)) for r in _importance(heads, col).dropna()
              .sort_values("importance", ascending=False, kind="stable").itertuples()]
    sizes = {0: False}
    for p in _percents(params):
        sizes[max(1, round(p / 100 * len(ranked)))] = False
    sizes[len(circuit)] = True  # the circuit is the top len(circuit) heads of the same ranking
    n_heads, _ = model.head_counts()
    all_heads = [(layer, h) for layer in model.layers() for h in range(n_heads)]  # ablated: every head

    sums: dict[str, dict] = {}
    counts: dict[str, int] = defaultdict(int)
    # the corrupted prompts' mean output of every head at each position, per group (samples spread over a cluster)
    for sample, (z, n) in zip(plan, fan_out(corrupt_outputs, model, plan, progress, f"means for {col}")):
        group = sums.setdefault(sample["group"], {})
        for layer, zl in z.items():
            group[layer] = group.get(layer, 0) + zl
        counts[sample["group"]] += n

    jobs = [(sample, {layer: s / counts[sample["group"]] for layer, s in sums[sample["group"]].items()}, ranked,
             list(sizes), all_heads) for sample in plan]
    ld = defaultdict(float)
    top1 = defaultdict(float)
    n_total = 0
    for clean_ld, by_size, n in fan_out(ablated_logit_differences, model, jobs, progress, f"faithfulness of {col}"):
        ld["clean"] += clean_ld
        for k, (k_ld, k_top1) in by_size.items():
            ld[k] += k_ld
            top1[k] += k_top1
        n_total += n
    clean_ld, ablated = ld["clean"] / n_total, ld[0] / n_total
    rows = []
    for k, is_circuit in sorted(sizes.items()):
        mean = ld[k] / n_total
        rows.append({"task": task, "heads": k, "percent": 100 * k / len(all_heads),
                     "circuit": is_circuit, "ld": mean, "clean_ld": clean_ld, "ablated_ld": ablated,
                     "recovered": mean / clean_ld if clean_ld else float("nan"),
                     "normalised": (mean - ablated) / (clean_ld - ablated) if clean_ld != ablated else float("nan"),
                     "top1": top1[k] / n_total})
    return pd.DataFrame(rows)


def corrupt_outputs(model: Model, sample: dict) -> tuple[dict, int]:
    """({layer: each head's output on the sample's corrupted prompts, summed over prompts in at least float32:
    (N, H, d), on the CPU}, number of prompts)."""
    batch = TaskBatch(model, sample)
    z = cache_run(model, batch.corrupt).z
    return ({layer: zl.to(torch.promote_types(zl.dtype, torch.float32)).sum(0).cpu() for layer, zl in z.items()},
            len(batch.correct))  # on the CPU: a worker's GPU tensors could not be read back by a driver without one


def ablated_logit_differences(model: Model, job: tuple) -> tuple[float, dict, int]:
    """One sample of the faithfulness curve: (clean logit difference summed over its prompts, {k: (summed logit
    difference, top-1 count) with every head but the top k of `ranked` mean-ablated}, number of prompts).
    job: (planned sample, {layer: mean head outputs (N, H, d)}, ranked heads, sizes k, every head)."""
    sample, means, ranked, sizes, all_heads = job
    means = {layer: m.to(model.device) for layer, m in means.items()}
    batch = TaskBatch(model, sample)
    with torch.no_grad():
        clean_ld = float(batch.metric(last_logits(model, batch.clean)).sum())
    by_size = {}
    for k in sizes:
        keep = set(ranked[:k])
        values = {(layer, h): means[layer][:, h] for layer, h in all_heads if (layer, h) not in keep}
        with torch.no_grad(), patch_heads(model, values):
            logits = last_logits(model, batch.clean)
        by_size[k] = float(batch.metric(logits).sum()), float((logits.argmax(-1) == batch.correct).sum())
    return clean_ld, by_size, len(batch.correct)


# ---- figures of this analysis's view (also for notebooks)


def faithfulness_curves(faith: pd.DataFrame) -> go.Figure:
    """Logit difference kept (% of the clean model's) against circuit size, per task, with every head outside the
    circuit mean-ablated (the `faithfulness` table of a circuits run); the chosen circuit marked."""
    fig = go.Figure()
    for task, part in faith.groupby("task", sort=False):
        part = part.sort_values("heads")
        fig.add_trace(go.Scatter(x=part["heads"], y=100 * part["recovered"], mode="lines+markers", name=str(task),
                                 customdata=part[["percent", "ld", "top1"]].to_numpy(),
                                 hovertemplate="%{x} heads (%{customdata[0]:.1f} %)<br>kept %{y:.1f} %<br>logit diff "
                                               "%{customdata[1]:.3f}<br>top-1 %{customdata[2]:.2f}<extra></extra>"))
        chosen = part[part["circuit"]]
        fig.add_trace(go.Scatter(x=chosen["heads"], y=100 * chosen["recovered"], mode="markers", showlegend=False,
                                 marker={"size": 14, "symbol": "star", "color": "#e4572e"},
                                 hovertemplate=f"{task}: the circuit<extra></extra>"))
    fig.add_hline(y=100, line={"dash": "dot", "color": "#888"})
    fig.update_layout(title="faithfulness: logit difference kept with only the top heads (the rest mean-ablated)",
                      xaxis_title="heads kept (by |effect|)", yaxis_title="% of the clean logit difference",
                      xaxis={"type": "log", "tickformat": "d"}, template=TEMPLATE)
    return fig


def position_effects(positions: pd.DataFrame, sample: int, heads: list[tuple[int, int]], value: str = "eap") -> go.Figure:
    """Each chosen head's effect at each position of one sample's first prompt (the `positions` table of a circuits
    run: `eap` always, `patching` with per_position), heads × tokens, diverging around 0."""
    part = positions[positions["sample"] == sample]
    if part.empty:
        raise ValueError(f"no positions for sample {sample}")
    tokens = part.drop_duplicates("position").sort_values("position")["token"].tolist()
    z = np.array([part[(part["layer"] == layer) & (part["head"] == head)].sort_values("position")[value].to_numpy(float)
                  for layer, head in heads])
    labels = [head_label(layer, head) for layer, head in heads]
    bound = float(np.nanmax(np.abs(z))) if z.size else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=[f"{i}: {t}" for i, t in enumerate(tokens)], y=labels, colorscale=DIVERGING,
                               zmid=0.0, zmin=-bound, zmax=bound, colorbar={"title": value},
                               hovertemplate="head %{y}<br>token %{x}<br>" + value + " %{z:.4g}<extra></extra>"))
    fig.update_layout(title=f"sample {sample}: {value} of each head at each position (Δ logit difference)",
                      xaxis_title="position: token (first prompt)", yaxis_title="head",
                      yaxis={"autorange": "reversed", "type": "category"}, template=TEMPLATE)
    return fig
