"""`taxonomy`: what kind of head each head is.

Language models and encoders, on repeated random token sequences ([specials] R R, R of T random tokens):
- induction: mean attention of a second-copy query to the token after its previous occurrence (offset T − 1);
- duplicate_token: to the previous occurrence itself (offset T); previous_token: to the previous position
  (offset 1, every query but the first) — exact diagonals of the attention matrix from `diagonal_attention`;
- distance: mean attention distance |query − key| in tokens (local vs global);
- sparse-pattern class (causal models), our reading of MInference's offline pattern search: from the exact
  attention of the last `last_queries` queries, the recall (attention mass kept) of three patterns under one
  budget of K = budget × N keys per query — A-shape (the first K/8 keys plus a local window of the rest),
  vertical-slash (the K/2 key columns and K/2 diagonals with the most mass), block-sparse (the key blocks of
  min(block, K/4) keys with the most mass, as many as fit in K); a head takes the pattern with the highest
  recall (the simplest — A-shape, then block-sparse, then vertical-slash — among those within 0.01 of it, since
  vertical-slash, chosen freely, contains the others), or "dense" when none keeps `dense_below` of the mass.
ViTs, on images: distance — mean attention distance on the patch grid (in patches, and in pixels), special
tokens (CLS, registers) dropped as keys and queries; `cls_rule` "renormalize" re-normalises the patch keys'
attention (the ViT paper), "zero" lets the dropped mass count as 0 (common re-implementations).

For causal language models the run ends with an ablation test: the loss on the predictable part of the repeated
half with the top-k induction heads ablated, against k random heads from outside the top quarter.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from interp.app.figures import TEMPLATE, score_by_layer
from interp.fanout import fan_out
from interp.hooks import Pass, alone, mask_heads
from interp.kernels import AttentionGeometry, attention_tile, call_stats, diagonal_attention, grid_distance
from interp.layout import fixed_masking, token_layout
from interp.models import Model
from interp.params import CLS_RULE, IMAGES, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .images import BUILTIN_IMAGES, image_files, load_image
from .inputs import plain_token_pool, special_tokens

PATTERNS = ("a_shape", "block_sparse", "vertical_slash")  # simplest first: a tie goes to the simpler pattern
TIE = 0.01
DEFAULT_HALF = 128

TEXT_STATS = dict(stats=("lse", "mean_distance"))  # what a text sample's probe asks of every call


@dataclass(frozen=True)
class TaxonomyParams(Params):
    analysis = "taxonomy"
    half: int | None = param(None, f"length T of the repeated random sequence (default {DEFAULT_HALF}, or what fits)",
                             metavar="T", low=2)
    images: str | None = param(None, IMAGES)
    cls_rule: str = param("renormalize", CLS_RULE)
    last_queries: int = param(64, "queries whose attention decides the sparse pattern", metavar="N", low=1)
    budget: float = param(0.1, "keys kept per query by each sparse pattern, a fraction of the context in (0, 1]",
                          metavar="F", low=0, high=1)
    block: int = param(64, "block-sparse block size in keys", metavar="N", low=1)
    dense_below: float = param(0.8, "a head is dense when no pattern keeps this fraction of its mass, in (0, 1]",
                               metavar="F", low=0, high=1)
    ablate_k: int | None = param(None, "induction heads ablated in the loss test (default 5 % of the heads; 0 skips "
                                 "it)", metavar="K", low=0)
    ablate_mode: str = param("zero", "zero or uniform (see interp.hooks.mask_heads)", metavar="MODE",
                             choices=("zero", "uniform"))
    ablate_draws: int = param(3, "random-head controls in the loss test", metavar="N", low=0)

    def __post_init__(self):
        if self.budget == 0 or self.dense_below == 0:
            raise ValueError("taxonomy parameters budget and dense_below are fractions in (0, 1]")


class Taxonomy(Analysis):
    name = "taxonomy"
    description = "induction / previous-token / duplicate-token heads, attention distance and sparse-pattern class"
    kinds = ("llm", "encoder", "vit", "lvlm")
    scores = {
        "induction": "mean attention to the token after the previous occurrence (repeated random tokens)",
        "previous_token": "mean attention to the previous position",
        "duplicate_token": "mean attention to the previous occurrence of the same token",
        "distance": "mean attention distance: tokens (text) or patches (images); high = global, low = local",
        "distance_px": "mean attention distance in pixels (patches × patch size)",
        "a_shape_recall": "attention mass kept by an A-shape mask (sink + local window) of the budget",
        "vertical_slash_recall": "attention mass kept by the best vertical columns + slash diagonals of the budget",
        "block_sparse_recall": "attention mass kept by the best key blocks of the budget",
    }
    Params = TaxonomyParams
    describe = ("input", "n_tokens")
    roles = (
        Role("induction", "induction", threshold=0.2,
             description="induction head: > 0.2 of its attention on the token after the previous occurrence (repeated "
                         "random tokens; uniform attention puts ~1/n there)"),
        Role("previous_token", "previous_token", threshold=0.5,
             description="previous-token head: most (> 0.5) of its attention on the previous position"),
        Role("duplicate_token", "duplicate_token", threshold=0.2,
             description="duplicate-token head: > 0.2 of its attention on the previous occurrence of the same token"),
        *(Role(f"pattern_{p}", "pattern", rule="class", value=p,
               description=f"sparse-pattern class {p}: the simplest pattern keeping ≥ dense_below of its mass "
                           "(MInference's offline search, causal models)") for p in PATTERNS),
        Role("pattern_dense", "pattern", rule="class", value="dense",
             description="sparse-pattern class dense: no pattern keeps dense_below of its mass"),
    )

    def score_columns(self, model: Model, params: dict) -> dict[str, str]:
        if model.family.kind == "vit":
            cols = ["distance", "distance_px"]
        else:
            cols = ["induction", "previous_token", "duplicate_token", "distance"]
            if _causal(model):
                cols += [f"{p}_recall" for p in PATTERNS]
        return {c: self.scores[c] for c in cols}

    # ---- the plan

    def read_paths(self, model: Model, params: dict) -> tuple[str, ...]:
        return ("images",) if model.family.kind == "vit" else ()

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        if model.family.kind == "vit":
            sources = [str(p) for p in image_files(params["images"])] if params["images"] else list(range(BUILTIN_IMAGES))
            n = options.samples or min(8, len(sources))
            if not 1 <= n <= len(sources):
                raise ValueError(f"--samples {n}: there are {len(sources)} images (give 1..{len(sources)})")
            return [{"image": s} for s in sources[:n]]
        n = options.samples or 8
        prefix, suffix = _specials(model)
        room = (options.max_tokens or model.max_tokens or 2 * DEFAULT_HALF + 8) - len(prefix) - len(suffix)
        half = params["half"] or min(DEFAULT_HALF, room // 2)
        if half < 3 or 2 * half > room:
            raise ValueError(f"a repeated half of {half} tokens does not fit {model.name}'s "
                             f"{room + len(prefix) + len(suffix)} tokens (give --half 3..{room // 2})")
        rng = random.Random(options.seed)
        return [{"seed": rng.randrange(2**31), "half": half} for _ in range(n)]

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        if "image" in sample:
            return fixed_masking(model, model.prepare(images=load_image(sample["image"])))
        return text_inputs(model, sample)

    # ---- one sample

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> pd.DataFrame:
        return alone(model, self.sample_pass(model, sample, options, params), options, progress)

    def sample_pass(self, model: Model, sample: dict, options: Options, params: dict) -> Pass:
        """One sample's part of a forward pass (`interp.hooks.Pass`); it finishes as `score_sample`'s rows."""
        inputs = self.sample_inputs(model, sample, options, params)
        rows = []
        finish = lambda: pd.concat(rows, ignore_index=True)  # noqa: E731
        if "image" in sample:
            return Pass(inputs, self._vit_probe(model, inputs, params, rows), finish)
        return Pass(inputs, self._text_probe(model, sample, params, rows), finish, stats=TEXT_STATS)

    def _text_probe(self, model: Model, sample: dict, params: dict, rows: list):
        half = sample["half"]
        start = len(_specials(model)[0])  # first token of the first copy

        def probe(call) -> None:
            keys, geometry = call.head_keys(), call.geometry
            st = call_stats(call, **TEXT_STATS)
            diag = diagonal_attention(call.q, keys, [1, half - 1, half], lse=st.lse, geometry=geometry)[0]  # (H, N, 3)
            second = slice(start + half, start + 2 * half)
            first = 1 if call.causal else 0
            cols = {"induction": diag[:, second, 1].mean(-1), "previous_token": diag[:, 1:, 0].mean(-1),
                    "duplicate_token": diag[:, second, 2].mean(-1),
                    "distance": st.mean_distance[0, :, first:].float().mean(-1)}
            if call.causal:
                cols.update(pattern_recalls(call.q, keys, st.lse, geometry, params))
            rows.append(head_rows(call.layer, call.heads, call.kv_heads, half=half,
                                  **{k: v.cpu().numpy() for k, v in cols.items()}))
        return probe

    def _vit_probe(self, model: Model, inputs: dict, params: dict, rows: list):
        layout = token_layout(model, inputs)
        grid = layout.grids[0]
        n = layout.segments.shape[1]
        positions, cells = grid.kept()  # the cells that hold a token (ViT-MAE drops some)
        coords = torch.zeros(n, 2)
        coords[positions.cpu()] = cells
        special = torch.ones(n, dtype=torch.bool)
        special[positions.cpu()] = False
        patch = grid.patch or float("nan")

        def probe(call) -> None:
            d = grid_distance(call.q, call.head_keys(), query_coords=coords.to(call.q.device),
                              key_coords=coords.to(call.q.device), special_keys=special,
                              renormalize=params["cls_rule"] == "renormalize",
                              geometry=call.geometry)[0][:, ~special.to(call.q.device)].mean(-1)    # (H,)
            rows.append(head_rows(call.layer, call.heads, call.kv_heads, distance=d.cpu().numpy(),
                                  distance_px=(d * patch).cpu().numpy()))
        return probe

    # ---- the run

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        keys = ["layer", "head", "kv_head"]
        cols = [c for c in self.scores if c in samples.columns]
        heads = samples.groupby(keys, as_index=False)[cols].mean()
        recalls = [f"{p}_recall" for p in PATTERNS]
        if all(c in heads for c in recalls):
            kept = heads[recalls].to_numpy()
            best = kept.max(1, keepdims=True)
            simplest = (kept >= best - TIE).argmax(1)  # the first (simplest) pattern within TIE of the best
            heads["pattern"] = np.where(best[:, 0] >= params["dense_below"], np.array(PATTERNS)[simplest], "dense")
        return heads.sort_values(keys, ignore_index=True)

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The ablation test (causal language models): loss on the repeated half with the top-k induction heads
        ablated, against k random heads from outside the top quarter."""
        if model.family.kind != "llm" or "induction" not in heads or params["ablate_k"] == 0:
            return {}
        n = len(heads)
        k = params["ablate_k"] or max(1, math.ceil(0.05 * n))
        if k > n - n // 4:
            raise ValueError(f"ablate_k {k}: only {n - n // 4} heads lie outside the top quarter for the control")
        ranked = heads.sort_values("induction", ascending=False, kind="stable")
        pairs = list(zip(ranked["layer"].astype(int), ranked["head"].astype(int)))
        rng = random.Random(options.seed)
        tests = [("none", []), ("induction", pairs[:k])]
        tests += [(f"random-{i}", rng.sample(pairs[n // 4:], k)) for i in range(params["ablate_draws"])]
        jobs = [(s, chosen, params["ablate_mode"]) for _, chosen in tests for s in plan]
        losses = fan_out(ablated_losses, model, jobs, progress, "ablation")  # independent: spread over a cluster
        rows = []
        for t, (condition, chosen) in enumerate(tests):
            part = np.array(losses[t * len(plan):(t + 1) * len(plan)])  # (samples, 2)
            rows.append({"condition": condition, "k": len(chosen), "mode": params["ablate_mode"],
                         "loss_first": part[:, 0].mean(), "loss_repeated": part[:, 1].mean(),
                         "heads": ",".join(f"{layer}-{head}" for layer, head in chosen)})
        return {"ablation": pd.DataFrame(rows)}

    def report(self, result) -> list[str]:
        h = result.heads
        lines = []
        if "induction" in h:
            for col in ("induction", "previous_token", "duplicate_token"):
                top = h.sort_values(col, ascending=False).head(5)
                lines.append(f"top {col} heads: " + ", ".join(f"{r.layer}-{r.head} ({getattr(r, col):.2f})"
                                                            for r in top.itertuples()))
        if "pattern" in h:
            lines.append("sparse patterns: " + ", ".join(f"{k} {v}" for k, v in h["pattern"].value_counts().items()))
        ablation = result.tables.get("ablation")
        if ablation is not None:
            lines.append("loss on the repeated half (" + str(ablation["mode"].iloc[0]) + "-ablation): " + " · ".join(
                f"{r.condition}{'' if r.k == 0 else f' ({r.k} heads)'} {r.loss_repeated:.3f}"
                for r in ablation.itertuples()))
        return lines

    def view(self, result) -> list:
        """Each score per layer, and the induction heads' ablation test."""
        out = [score_by_layer(result.heads, s) for s in result.scores if s != "distance_px"]
        if "ablation" in result.tables:
            out.append(ablation_bars(result.tables["ablation"]))
        return out



def _causal(model: Model) -> bool:
    return model.family.kind in ("llm", "lvlm")


def _specials(model: Model) -> tuple[list[int], list[int]]:
    return special_tokens(model.tokenizer) if model.tokenizer is not None else ([], [])


def repeated_tokens(model: Model, sample: dict) -> list[int]:
    """[prefix specials] R R [suffix specials], R: `half` random non-special tokens drawn from the sample's seed
    (a model given without a tokenizer: any id of its vocabulary, no specials)."""
    prefix, suffix = _specials(model)
    pool = (plain_token_pool(model.tokenizer) if model.tokenizer is not None
            else list(range(model.config.get_text_config().vocab_size)))
    rng = random.Random(sample["seed"])
    half = sample["half"]  # distinct tokens when the vocabulary allows: each has one previous occurrence
    r = rng.sample(pool, half) if len(pool) >= half else [rng.choice(pool) for _ in range(half)]
    ids = prefix + r + r + suffix
    model.check_length(len(ids))
    return ids


def text_inputs(model: Model, sample: dict) -> dict:
    """The model inputs of a text sample: its repeated random tokens (1, N)."""
    ids = torch.tensor([repeated_tokens(model, sample)], device=model.device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def ablated_losses(model: Model, job: tuple) -> tuple[float, float]:
    """One sample of the ablation test: `repeat_losses` with the chosen heads ablated.
    job: (planned sample, [(layer, head)], ablation mode)."""
    sample, chosen, mode = job
    with mask_heads(model, chosen, mode=mode):
        return repeat_losses(model, text_inputs(model, sample), sample)


def repeat_losses(model: Model, inputs: dict, sample: dict) -> tuple[float, float]:
    """Next-token loss (nats) on the first copy and on the predictable part of the second (its tokens 2 … T,
    which an induction mechanism can copy from the first)."""
    start, half = len(_specials(model)[0]), sample["half"]
    with torch.no_grad():
        logits = model.hf(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    nll = F.cross_entropy(logits[:-1], ids[1:], reduction="none")   # nll[i]: predicting token i + 1
    first = nll[start:start + half - 1].mean()
    repeated = nll[start + half:start + 2 * half - 1].mean()
    return float(first), float(repeated)


def pattern_recalls(q: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, geometry: AttentionGeometry,
                    params: dict) -> dict[str, torch.Tensor]:
    """Per head, the attention mass kept by each sparse pattern on the last queries: {"<pattern>_recall": (H,)}.

    q: (1, H, N, d); keys: (1, H, N, d) (one per query head); lse: (1, H, N)."""
    n = q.shape[2]
    m = min(params["last_queries"], n)
    p = attention_tile(q, keys, (n - m, n), (0, n), lse=lse, geometry=geometry)[0].float()   # (H, m, N)
    return recalls_of(p, geometry.query_positions[n - m:].to(p.device), params)


def recalls_of(p: torch.Tensor, pos: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """The sparse patterns' recalls of attention probabilities p (H, m, N) of m queries at positions pos (m,)."""
    n = p.shape[-1]
    j = torch.arange(n, device=p.device)
    budget = max(2, round(params["budget"] * n))
    sink = max(1, budget // 8)
    a_shape = (j[None] < sink) | ((pos[:, None] - j[None] >= 0) & (pos[:, None] - j[None] < budget - sink))
    offset = (pos[:, None] - j[None]).clamp(min=-1)                              # (m, N); −1: a future key
    columns = p.mean(1).topk(min(n, budget // 2), dim=-1).indices               # (H, v)
    diag_mass = torch.zeros(p.shape[0], n + 1, device=p.device).index_add_(
        1, (offset + 1).reshape(-1), p.reshape(p.shape[0], -1))[:, 1:]        # (H, N): mass by offset
    slashes = diag_mass.topk(min(n, budget - budget // 2), dim=-1).indices       # (H, s)
    keep_vs = torch.zeros_like(p, dtype=torch.bool)
    keep_vs |= torch.zeros(p.shape[0], n, dtype=torch.bool, device=p.device).scatter_(1, columns, True)[:, None]
    is_slash = torch.zeros(p.shape[0], n + 1, dtype=torch.bool, device=p.device).scatter_(1, slashes + 1, True)
    keep_vs |= is_slash.gather(1, (offset + 1).reshape(1, -1).expand(p.shape[0], -1)).view_as(p)  # index 0: future
    block = max(1, min(params["block"], budget // 4))
    n_blocks = math.ceil(n / block)
    block_mass = F.pad(p.sum(1), (0, n_blocks * block - n)).view(p.shape[0], n_blocks, block).sum(-1)
    chosen = block_mass.topk(min(n_blocks, max(1, budget // block)), dim=-1).indices
    keep_bs = torch.zeros(p.shape[0], n_blocks, dtype=torch.bool, device=p.device).scatter_(1, chosen, True)
    keep_bs = keep_bs.repeat_interleave(block, dim=1)[:, :n][:, None]
    recall = lambda keep: (p * keep).sum(-1).mean(-1)  # noqa: E731
    return {"a_shape_recall": recall(a_shape[None]), "vertical_slash_recall": recall(keep_vs),
            "block_sparse_recall": recall(keep_bs)}


# ---- figures of this analysis's view (also for notebooks)


def ablation_bars(ablation: pd.DataFrame) -> go.Figure:
    """Loss on the repeated half with heads ablated (the taxonomy's `ablation` table)."""
    fig = go.Figure([go.Bar(x=ablation["condition"], y=ablation[col], name=name)
                     for col, name in (("loss_first", "first copy"), ("loss_repeated", "repeated copy"))])
    mode = ablation["mode"].iloc[0] if "mode" in ablation else ""
    fig.update_layout(title=f"next-token loss with heads ablated ({mode})", xaxis_title="heads ablated",
                      yaxis_title="loss (nats)", barmode="group", template=TEMPLATE)
    return fig
