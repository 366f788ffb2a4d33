"""`vit`: the heads of a vision transformer — how far they look, how much the model needs them, and how their
attention falls off with distance.

Per head, over an evaluation set of images (in batches, one batch per sample):
- distance / distance_px: mean attention distance on the patch grid (the ViT paper's Figure 11; `cls_rule` as in
  `taxonomy`);
- importance by pruning (classifiers): accuracy (percentage points) lost and loss gained when the head is removed,
  its output before the output projection either zeroed or replaced by its mean over the batch's images and
  positions. Labels: the task's own for `organism-vit`; for any other classifier, its predictions on the
  unpruned images (so the clean accuracy is 100 % and a drop is disagreement with the full model);
- the `strength` table: per head and grid-distance bin (Euclidean distance in patches, rounded), the attention
  mass a patch query gives to patch keys at that distance, and the mean attention per such key.
The run ends with pruning curves (`pruning` table): accuracy and loss when the k heads ranked most important
(by zero-ablation accuracy drop, then loss rise) are pruned together, against the k ranked least important.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from interp.app.figures import TEMPLATE, index_axis
from interp.fanout import fan_out
from interp.hooks import mask_heads, trace
from interp.kernels import attention_tile
from interp.layout import ImageGrid, fixed_masking, token_layout
from interp.models import Model
from interp.organisms.vit import dataset
from interp.params import BATCH, CLS_RULE, IMAGES, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .images import BUILTIN_IMAGES, image_files, load_image

ORGANISM = "organism-vit"
EVAL_SEED = 2_000_003  # organism-vit's evaluation scenes: distinct from its training and test seeds


@dataclass(frozen=True)
class VitParams(Params):
    analysis = "vit"
    images: str | None = param(None, IMAGES)
    cls_rule: str = param("renormalize", CLS_RULE)
    batch: int = param(64, BATCH)
    importance: bool = param(True, "measure each head's importance by pruning (classifiers)")


class VitHeads(Analysis):
    name = "vit"
    description = "ViT heads: mean attention distance, importance by pruning, attention strength against distance"
    kinds = ("vit",)
    scores = {
        "distance": "mean attention distance in patches (patch queries on patch keys): high = global",
        "distance_px": "mean attention distance in pixels",
        "accuracy_drop_zero": "accuracy lost (percentage points) with the head's output zeroed",
        "loss_rise_zero": "loss gained with the head's output zeroed",
        "accuracy_drop_mean": "accuracy lost (percentage points) with the head's output mean-ablated",
        "loss_rise_mean": "loss gained with the head's output mean-ablated",
    }
    Params = VitParams
    sample_tables = ("strength",)
    roles = (
        Role("global", "distance", rule="top", fraction=0.1,
             description="global head: the 10 % of heads with the longest mean attention distance"),
        Role("local", "distance", rule="top", fraction=0.1, sign=-1,
             description="local head: the 10 % of heads with the shortest mean attention distance"),
        Role("important", "accuracy_drop_mean", rule="top", fraction=0.1,
             description="important head: the 10 % of heads whose mean-ablation costs the most accuracy"),
    )

    def score_columns(self, model: Model, params: dict) -> dict[str, str]:
        cols = list(self.scores) if _classifier(model) and params["importance"] else ["distance", "distance_px"]
        return {c: self.scores[c] for c in cols}

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        if model.name == ORGANISM and not params["images"]:
            return [{"organism": EVAL_SEED + b, "size": params["batch"]} for b in range(options.samples or 4)]
        sources = [str(p) for p in image_files(params["images"])] if params["images"] else list(range(BUILTIN_IMAGES))
        batches = [sources[i:i + params["batch"]] for i in range(0, len(sources), params["batch"])]
        n = options.samples or min(4, len(batches))  # batches
        if not 1 <= n <= len(batches):
            raise ValueError(f"--samples {n}: {len(sources)} images make {len(batches)} batches of {params['batch']}")
        return [{"images": b} for b in batches[:n]]

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        return fixed_masking(model, model.prepare(images=_images(sample)[0]))

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> dict[str, pd.DataFrame]:
        images, labels = _images(sample)
        inputs = fixed_masking(model, model.prepare(images=images))
        layout = token_layout(model, inputs)
        grids = [_patch_pairs(grid, model.device) for grid in layout.grids]  # one per image, in batch order
        n_bins = max(int(bins.max()) + 1 for _, _, bins in grids)
        rows, strength, means = [], [], {}
        patch = layout.grids[0].patch or float("nan")

        def probe(call) -> None:
            keys, n_tok, n_heads = call.head_keys(), call.q.shape[2], call.q.shape[1]
            d = torch.zeros(n_heads, device=call.q.device)
            mass = torch.zeros(n_heads, n_bins, device=call.q.device)     # per head and bin, summed over images
            per_key = torch.zeros(n_heads, n_bins, device=call.q.device)  # idem, of the mean attention per key
            with_keys = torch.zeros(n_bins, device=call.q.device)         # images with key pairs in each bin
            for b, (patches, dist, bins) in enumerate(grids):  # one image at a time: (H, N, N) at most
                p = attention_tile(call.q[b:b + 1], keys[b:b + 1], (0, n_tok), (0, n_tok),
                                   geometry=call.geometry.select(batch=slice(b, b + 1)))[0]
                pp = p[:, patches][:, :, patches].float()                         # patch queries × patch keys
                if params["cls_rule"] == "renormalize":
                    pp = pp / pp.sum(-1, keepdim=True).clamp_min(1e-30)
                d += (pp * dist).sum(-1).mean(-1)
                m = torch.zeros(n_heads, len(patches), n_bins, device=pp.device).scatter_add_(
                    -1, bins.expand_as(pp), pp)                                      # (H, P, bins)
                counts = torch.zeros(len(patches), n_bins, device=pp.device).scatter_add_(
                    1, bins, torch.ones_like(dist))                                  # (P, bins) keys per bin, per query
                has = counts > 0
                mass += m.mean(1)
                per_key += ((m / counts.clamp_min(1)) * has).sum(1) / has.sum(0).clamp_min(1)
                with_keys += has.any(0)
            d, mass, per_key = d / len(grids), mass / len(grids), per_key / with_keys  # NaN: no pair at that distance
            for i, h in enumerate(call.heads.tolist()):
                strength.append(pd.DataFrame({"layer": call.layer, "head": h, "n_images": len(images),
                                              "distance": np.arange(n_bins),
                                              "mass": mass[i].cpu().numpy(), "per_key": per_key[i].cpu().numpy()}))
            rows.append(head_rows(call.layer, call.heads, call.kv_heads, n_images=len(images),
                                  distance=d.cpu().numpy(), distance_px=(d * patch).cpu().numpy()))
            if call.z is not None:
                for i, h in enumerate(call.heads.tolist()):
                    means[(call.layer, h)] = call.z[:, :, i].float().mean((0, 1))

        importance = _classifier(model) and params["importance"]
        out = trace(model, inputs, probe, backend=options.backend, layers=options.layers, heads=options.heads,
                    keep=("q", "k", "z") if importance else ("q", "k"))
        table = pd.concat(rows, ignore_index=True)
        if importance:
            logits = out.logits.float()
            labels = logits.argmax(-1) if labels is None else labels.to(logits.device)
            clean = _metrics(logits, labels)
            table["accuracy_clean"], table["loss_clean"] = clean
            bar = progress.bar(total=2 * len(table), desc="pruning heads", leave=False)
            for mode in ("zero", "mean"):
                acc, loss = [], []
                for layer, head in zip(table["layer"], table["head"]):
                    with mask_heads(model, [(layer, head)], mode=mode, means=means):
                        a, lo = _metrics(_logits(model, inputs), labels)
                    acc.append(a)
                    loss.append(lo)
                    bar.update()
                table[f"accuracy_{mode}"], table[f"loss_{mode}"] = acc, loss
            bar.close()
        return {"samples": table, "strength": pd.concat(strength, ignore_index=True)}

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        keys = ["layer", "head", "kv_head"]
        w = samples["n_images"]
        cols = ["distance", "distance_px"] + [c for c in samples.columns if c.startswith(("accuracy_", "loss_"))]
        weighted = samples[cols].mul(w, axis=0).assign(**{k: samples[k] for k in keys}, n=w)
        sums = weighted.groupby(keys, as_index=False).sum()
        mean = sums[cols].div(sums["n"], axis=0)
        heads = sums[keys].join(mean[["distance", "distance_px"]])
        if "accuracy_zero" in mean:
            for mode in ("zero", "mean"):
                heads[f"accuracy_drop_{mode}"] = 100 * (mean["accuracy_clean"] - mean[f"accuracy_{mode}"])
                heads[f"loss_rise_{mode}"] = mean[f"loss_{mode}"] - mean["loss_clean"]
        return heads.sort_values(keys, ignore_index=True)

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """Pruning curves: the k most important heads pruned together against the k least important."""
        if "accuracy_drop_zero" not in heads:
            return {}
        ranked = heads.sort_values(["accuracy_drop_zero", "loss_rise_zero"], ascending=False, kind="stable")
        order = list(zip(ranked["layer"].astype(int), ranked["head"].astype(int)))
        rows = []
        steps = [(name, k) for k in range(len(order) + 1) for name in ("most", "least")]
        pruned = [order[:k] if name == "most" else order[len(order) - k:] for name, k in steps]
        per_sample = fan_out(pruned_metrics, model, [(sample, pruned) for sample in plan], progress, "pruning curves")
        for t, ((name, k), chosen) in enumerate(zip(steps, pruned)):
            results = [metrics[t] for metrics in per_sample]  # the samples' batches, in the plan's order
            n = sum(size for _, size in results)
            rows.append({"order": name, "k": k, "accuracy": 100 * sum(m[0] * s for m, s in results) / n,
                         "loss": sum(m[1] * s for m, s in results) / n,
                         "heads": ",".join(f"{layer}-{head}" for layer, head in chosen)})
        return {"pruning": pd.DataFrame(rows)}

    def report(self, result) -> list[str]:
        h = result.heads
        by_layer = h.groupby("layer")["distance"].agg(["min", "max"])
        lines = ["mean attention distance (patches) per layer, min–max over heads: " + ", ".join(
            f"{layer}: {r['min']:.2f}–{r['max']:.2f}" for layer, r in by_layer.iterrows())]
        pruning = result.tables.get("pruning")
        if pruning is not None:
            half = int(pruning["k"].max()) // 2
            at = pruning[pruning["k"] == half].set_index("order")
            lines.append(f"accuracy with {half} heads pruned: most important first {at.loc['most', 'accuracy']:.1f} %, "
                         f"least important first {at.loc['least', 'accuracy']:.1f} % "
                         f"(none pruned: {pruning[pruning['k'] == 0]['accuracy'].iloc[0]:.1f} %)")
        return lines

    def view(self, result) -> list:
        """Every head's attention distance by layer, the pruning curves, and attention strength against distance."""
        t = result.tables
        out = [distance_by_layer(result.heads)]
        if "pruning" in t:
            out.append(pruning_curves(t["pruning"]))
        if "strength" in t:
            out += [strength_by_distance(t["strength"], layer) for layer in sorted(t["strength"]["layer"].unique())]
        return out



def _classifier(model: Model) -> bool:
    """An image classifier with labels (its logits are class scores)."""
    return "ForImageClassification" in type(model.hf).__name__ and getattr(model.config, "num_labels", 0) > 0


def _patch_pairs(grid: ImageGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's patch tokens: (P,) their positions, (P, P) the grid distance between their cells in patches, and
    (P, P) its bin (rounded). Cells without a token (ViT-MAE's masked patches) are left out."""
    positions, cells = grid.kept()
    dist = torch.cdist(cells, cells).to(device)
    return positions.to(device), dist, dist.round().long()


def _images(sample: dict) -> tuple[list, torch.Tensor | None]:
    """The sample's images and labels (None: no labels, the model's own predictions stand in)."""
    if "organism" in sample:
        return dataset(sample["size"], sample["organism"])
    return [load_image(s) for s in sample["images"]], None


def pruned_metrics(model: Model, job: tuple) -> list[tuple[tuple[float, float], int]]:
    """One sample's batch under each pruning: [((accuracy, loss), batch size)] for each head list in `pruned`,
    labels from the dataset or else the unpruned model's predictions. job: (planned sample, [[(layer, head)]])."""
    sample, pruned = job
    images, labels = _images(sample)
    inputs = model.prepare(images=images)
    logits = _logits(model, inputs)
    labels = logits.argmax(-1) if labels is None else labels.to(logits.device)
    out = []
    for chosen in pruned:
        with mask_heads(model, chosen, mode="zero"):
            out.append((_metrics(_logits(model, inputs), labels), len(labels)))
    return out


def _logits(model: Model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.hf(**inputs).logits.float()


def _metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of logits (B, C) against labels (B,)."""
    return float((logits.argmax(-1) == labels).float().mean()), float(F.cross_entropy(logits, labels))


# ---- figures of this analysis's view (also for notebooks)


def distance_by_layer(heads: pd.DataFrame, column: str = "distance") -> go.Figure:
    """Each head's mean attention distance at its layer (the ViT paper's Figure 11): one point per head."""
    fig = go.Figure(go.Scatter(x=heads["layer"], y=heads[column], mode="markers", customdata=heads[["head"]],
                               marker={"size": 8, "opacity": 0.7},
                               hovertemplate="head %{x}-%{customdata[0]}<br>" + column + " %{y:.3g}<extra></extra>"))
    fig.update_layout(title=f"mean attention distance of every head ({column})", xaxis_title="layer",
                      yaxis_title=column, template=TEMPLATE, xaxis=index_axis(heads["layer"]))
    return fig


def pruning_curves(pruning: pd.DataFrame) -> go.Figure:
    """Accuracy as the k most (or least) important heads are pruned together (the `pruning` table)."""
    fig = go.Figure()
    for order, part in pruning.groupby("order", sort=False):
        fig.add_trace(go.Scatter(x=part["k"], y=part["accuracy"], mode="lines+markers", name=f"{order} important first",
                                 customdata=part[["loss"]], hovertemplate="%{x} heads pruned<br>accuracy %{y:.1f} %"
                                                                          "<br>loss %{customdata[0]:.3f}<extra></extra>"))
    fig.update_layout(title="accuracy as heads are pruned", xaxis_title="heads pruned (k)", yaxis_title="accuracy (%)",
                      template=TEMPLATE, xaxis=index_axis(pruning["k"]))
    return fig


def strength_by_distance(strength: pd.DataFrame, layer: int) -> go.Figure:
    """Mean attention per key against grid distance for each head of one layer (the `strength` table)."""
    rows = strength[strength["layer"] == layer]
    w = rows["n_images"] if "n_images" in rows else pd.Series(1.0, index=rows.index)
    part = rows.assign(wv=rows["per_key"] * w, w=w).groupby(["head", "distance"], as_index=False)[["wv", "w"]].sum()
    part["per_key"] = part["wv"] / part["w"]  # weighted by each batch's images
    fig = go.Figure([go.Scatter(x=g["distance"], y=g["per_key"], mode="lines+markers", name=f"head {head}")
                     for head, g in part.groupby("head")])
    fig.update_layout(title=f"attention strength against distance, layer {layer}", xaxis_title="distance (patches)",
                      yaxis_title="mean attention per key", template=TEMPLATE)
    return fig
