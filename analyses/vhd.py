"""`vhd`: vision-aware head divergence (He et al., ACL 2025) for vision-language models.

For each sample (an image and the prompt), the model first answers greedily with the image. Then the prompt
and that answer are run twice, teacher-forced: with the image, and without it. At every position that produces
an answer token (the prompt's last position, then each answer token but the last), each head's output before
the output projection is compared: VHD[l, h] = ‖A_lh(with image) − A_lh(without)‖₂ (squared with `squared`).
The teacher-forced answer tokens get the per-token inputs that generation gives generated tokens (the model's own
update between generation steps): PaliGemma's prefix-LM marks them as its causal suffix (token_type_ids 1), so
the prompt's positions never see the answer, as when the model generates. The image-free input is built one of
three ways, recorded in the run:
- "drop" (default): the image tokens are left out, so the text moves up and takes other positions (and RoPE
  phases) — the paper's unstated construction as most read it. The prompt is rendered without the image by the
  processor; a processor that requires an image (PaliGemma's) renders it with the image, and the image's tokens
  are then taken out of its inputs (PaliGemma: its `<bos>`, the prompt and the newline that closes it, all of it
  the bidirectional prefix, token_type_ids 0);
- "blank": a black image of the same size in its place, so every text token keeps its position;
- "mean": the same with an image of the processor's mean colour (it normalises to 0: the dataset mean).
Per head: `vhd` (mean over steps and samples) and `vhd_prompt` (the prompt's last position only). The `steps`
table keeps every step's VHD with its token; the `tvhd` table T-VHD per generated token: the sum over layers
of each layer's top-k VHD (k = `topk`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from PIL import Image

from interp.app.figures import TEMPLATE, Note, plain, score_by_layer
from interp.families import image_token
from interp.hooks import mask_heads, trace
from interp.models import Model
from interp.params import IMAGES, MAX_NEW_TOKENS, PROMPT, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .images import BUILTIN_IMAGES, image_files, load_image
from .inputs import greedy, lvlm_prompt

NO_IMAGE = ("drop", "blank", "mean")
DEFAULT_PROMPT = "Describe the image."


@dataclass(frozen=True)
class VHDParams(Params):
    analysis = "vhd"
    images: str | None = param(None, IMAGES)
    prompt: str = param(DEFAULT_PROMPT, PROMPT)
    max_new_tokens: int = param(16, MAX_NEW_TOKENS)
    no_image: str = param("drop", "the image-free input: drop (leave the image tokens out), blank or mean",
                          metavar="HOW", choices=NO_IMAGE)
    squared: bool = param(False, "VHD as the squared norm of the difference (the paper's code: the norm)")
    topk: int = param(5, "heads per layer summed into T-VHD", metavar="K", low=1)


class VHD(Analysis):
    name = "vhd"
    description = "vision-aware head divergence: how much each head's output changes without the image"
    kinds = ("lvlm",)
    scores = {
        "vhd": "mean over answer steps of ‖head output with the image − without‖ (before the output projection)",
        "vhd_prompt": "the same at the prompt's last position (the step that produces the first answer token)",
    }
    Params = VHDParams
    sample_tables = ("steps",)
    roles = (Role("vision_aware", "vhd", rule="top", fraction=0.1,
                  description="vision-aware head: the top 10 % of heads by VHD (the heads the image changes most)"),)

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        sources = [str(p) for p in image_files(params["images"])] if params["images"] else list(range(BUILTIN_IMAGES))
        n = options.samples or min(8, len(sources))
        if not 1 <= n <= len(sources):
            raise ValueError(f"--samples {n}: there are {len(sources)} images (give 1..{len(sources)})")
        return [{"image": s} for s in sources[:n]]

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        return model.prepare(lvlm_prompt(model, params["prompt"]), images=[load_image(sample["image"])])

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> dict[str, pd.DataFrame]:
        image = load_image(sample["image"])
        with_image = self.sample_inputs(model, sample, options, params)
        answer = greedy(model, with_image, params["max_new_tokens"]).to(model.device)       # (T,)
        without = image_free_inputs(model, params["prompt"], image, params["no_image"])
        if without["input_ids"].shape[-1] == with_image["input_ids"].shape[-1] and params["no_image"] == "drop":
            raise ValueError(f"{model.name}: the prompt without the image has as many tokens as with it")
        z_img = head_outputs(model, with_image, answer, options)
        z_no = head_outputs(model, without, answer, options)
        diff = (z_img - z_no).float().pow(2).sum(-1)                                       # (L, H, T)
        vhd = diff if params["squared"] else diff.sqrt()
        layers = options.layers or model.layers()
        n_heads, n_kv = model.head_counts()
        heads = torch.tensor(options.heads) if options.heads is not None else torch.arange(n_heads)
        tokens = [model.tokenizer.decode([t]) for t in answer.tolist()]
        rows, steps = [], []
        for i, layer in enumerate(layers):
            rows.append(head_rows(layer, heads, heads // (n_heads // n_kv), n_steps=len(tokens),
                                  vhd=vhd[i].mean(-1).cpu().numpy(), vhd_prompt=vhd[i, :, 0].cpu().numpy()))
            for j, h in enumerate(heads.tolist()):
                steps.append(pd.DataFrame({"step": np.arange(len(tokens)), "token": tokens, "layer": layer, "head": h,
                                           "vhd": vhd[i, j].cpu().numpy()}))
        return {"samples": pd.concat(rows, ignore_index=True), "steps": pd.concat(steps, ignore_index=True)}

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        keys = ["layer", "head", "kv_head"]
        return samples.groupby(keys, as_index=False)[["vhd", "vhd_prompt"]].mean().sort_values(keys, ignore_index=True)

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        return {"tvhd": t_vhd(extras["steps"], params["topk"])}

    def report(self, result) -> list[str]:
        top = result.top("vhd", k=5)
        return [f"construction without the image: {self.stored_params(result.meta)['no_image']}",
                "highest VHD: " + ", ".join(f"{r.layer}-{r.head} ({r.vhd:.3g})" for r in top.itertuples())]

    def view(self, result) -> list:
        """VHD per layer; for the first samples, the prompt and the model's answer, the image, and T-VHD along the
        answer."""
        out = [score_by_layer(result.heads, "vhd")]
        if "tvhd" in result.tables:
            tvhd, prompt = result.tables["tvhd"], self.stored_params(result.meta)["prompt"]
            for s in sorted(int(s) for s in tvhd["sample"].unique())[:4]:
                answer = "".join(tvhd[tvhd["sample"] == s].sort_values("step")["token"]).strip()
                out += [Note(f"sample {s}: prompt “{prompt}” → answer “{answer}”"),
                        sample_image(result.kept_plan[s]["image"], f"sample {s}: the image"), tvhd_along_text(tvhd, s)]
        return out



def image_free_inputs(model: Model, prompt: str, image, how: str) -> dict:
    """The prompt without the image: its tokens dropped ("drop"), or a neutral image of the same size in its place —
    black ("blank") or the processor's mean colour ("mean"). For "drop", a processor that refuses a text-only
    prompt (PaliGemma's requires an image) renders the prompt with the image, whose tokens `without_image_tokens`
    then takes out."""
    if how == "drop":
        try:
            return model.prepare(lvlm_prompt(model, prompt, image=False), images=[])
        except ValueError:  # the processor requires an image
            return without_image_tokens(model, model.prepare(lvlm_prompt(model, prompt), images=[image]))
    if how not in NO_IMAGE:
        raise ValueError(f"no_image {how!r}: choose from {', '.join(NO_IMAGE)}")
    proc = getattr(model.processor, "image_processor", model.processor)
    mean = getattr(proc, "image_mean", None) or [0.5, 0.5, 0.5]
    colour = (0, 0, 0) if how == "blank" else tuple(int(round(255 * m)) for m in mean)
    return model.prepare(lvlm_prompt(model, prompt), images=[Image.new("RGB", image.size, colour)])


def without_image_tokens(model: Model, inputs: dict) -> dict:
    """The inputs of one sample (1, N) without the image: each per-token input (1, N) — ids, attention mask, token
    types — keeps the positions that are not the image token; the image's own inputs (pixels, sizes) and the
    processor's training `labels` are left out."""
    ids = inputs["input_ids"]
    keep = ids[0] != image_token(model.config)
    return {k: v[:, keep] for k, v in inputs.items() if torch.is_tensor(v) and v.shape == ids.shape and k != "labels"}


def teacher_forced(model: Model, inputs: dict, answer: torch.Tensor) -> dict:
    """The inputs of one sample (1, N) followed by the answer (T,) but its last token: (1, N + T − 1), each
    per-token input extended one token at a time by the model's own update between generation steps, so the answer
    is marked as generated tokens are (attention mask 1; PaliGemma's token_type_ids 1, its causal suffix;
    mm_token_type_ids 0, text). The processor's training `labels` are left out."""
    n = inputs["input_ids"].shape[-1]
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "labels")}
    kwargs.setdefault("attention_mask", torch.ones_like(inputs["input_ids"]))
    for _ in range(len(answer) - 1):
        kwargs = model.hf._update_model_kwargs_for_generation({}, kwargs, is_encoder_decoder=False)
    stale = [k for k, v in kwargs.items() if torch.is_tensor(v) and v.shape == (1, n)]
    if stale and len(answer) > 1:
        raise ValueError(f"{model.name}: generation does not extend the per-token inputs {stale}, so the answer "
                         "cannot be teacher-forced as it is generated")
    return dict(kwargs, input_ids=torch.cat([inputs["input_ids"], answer[None, :-1].to(inputs["input_ids"])], -1))


def head_outputs(model: Model, inputs: dict, answer: torch.Tensor, options: Options) -> torch.Tensor:
    """Each head's output before the output projection at the positions that produce the answer's tokens, with
    the answer teacher-forced after the prompt (`teacher_forced`): (L, H, T, d) for the captured layers and
    heads."""
    n = inputs["input_ids"].shape[-1]
    full = teacher_forced(model, inputs, answer)
    model.check_length(full["input_ids"].shape[-1])
    at = torch.arange(n - 1, n - 1 + len(answer), device=model.device)
    outs = {}

    def probe(call) -> None:
        outs[call.layer] = call.z[0, at.to(call.z.device)].transpose(0, 1)                 # (H, T, d)
    trace(model, full, probe, backend=options.backend, layers=options.layers, heads=options.heads, keep=("z",))
    return torch.stack([outs[i] for i in sorted(outs)])


def t_vhd(steps: pd.DataFrame, k: int) -> pd.DataFrame:
    """T-VHD per sample and generated token: the sum over layers of the top-k VHD of the layer's heads."""
    top = (steps.sort_values("vhd", ascending=False).groupby(["sample", "step", "layer"], sort=False).head(k)
           .groupby(["sample", "step", "layer"], as_index=False)["vhd"].sum())
    out = top.groupby(["sample", "step"], as_index=False)["vhd"].sum().rename(columns={"vhd": "tvhd"})
    tokens = steps.drop_duplicates(["sample", "step"])[["sample", "step", "token"]]
    return out.merge(tokens, on=["sample", "step"]).sort_values(["sample", "step"], ignore_index=True)


def default_vhr_layers(model: Model) -> list[int]:
    """The paper's reinforced layers for LLaVA-style models: layer 1 and the last 14."""
    n = model.n_layers()
    return sorted({1 % n, *range(max(0, n - 14), n)})


def vhr_heads(model: Model, with_image: dict, without: dict, layers: list[int] | None = None,
              alpha: float = 2.0) -> dict[int, list[int]]:
    """The heads VHR reinforces, chosen at the first generation step layer by layer: in each layer (in order), with
    the heads already chosen below it scaled by alpha, VHD at the prompt's last position, then `vhr_choice`. One
    pair of prompt passes per layer (the same choice as the paper's single layer-by-layer pass). layers: any
    indices (negative from the end; default `default_vhr_layers`). Returns {layer: [heads]}."""
    n = model.n_layers()
    layers = default_vhr_layers(model) if layers is None else layers
    bad = [lay for lay in layers if not -n <= int(lay) < n]
    if bad:
        raise ValueError(f"layers {bad} out of range: {model.name} has {n} layers")
    chosen: dict[int, list[int]] = {}
    for layer in sorted({int(lay) % n for lay in layers}):
        pairs = [(lay, h) for lay, hs in chosen.items() for h in hs]
        with mask_heads(model, pairs, mode="scale", factor=alpha):
            z_img = _prompt_head_outputs(model, with_image, layer)                     # (H, d)
            z_no = _prompt_head_outputs(model, without, layer)
        chosen[layer] = vhr_choice((z_img - z_no).float().norm(dim=-1), z_no.float().pow(2).sum(-1))
    return chosen


def vhr_choice(vhd: torch.Tensor, energy: torch.Tensor) -> list[int]:
    """One layer's VHR heads from its heads' VHD (H,) and image-free output squared norms (H,): VHD set to 0 where it
    exceeds μ + σ while the energy exceeds its μ + σ too (σ over the layer's heads, population), then the heads
    with VHD above the layer's median (the mean of the two middle values for an even count)."""
    outlier = (vhd > vhd.mean() + vhd.std(correction=0)) & (energy > energy.mean() + energy.std(correction=0))
    vhd = vhd.masked_fill(outlier, 0.0)
    return [int(h) for h in torch.nonzero(vhd > vhd.quantile(0.5)).flatten()]


def _prompt_head_outputs(model: Model, inputs: dict, layer: int) -> torch.Tensor:
    """(H, d) head outputs of one layer at the prompt's last position."""
    out = {}

    def probe(call) -> None:
        out["z"] = call.z[0, -1]
    trace(model, inputs, probe, layers=[layer], keep=("z",))
    return out["z"]


def vhr_generate(model: Model, prompt: str, image, *, alpha: float = 2.0, layers: list[int] | None = None,
                 no_image: str = "drop", max_new_tokens: int = 16) -> tuple[torch.Tensor, dict[int, list[int]]]:
    """Greedy generation with vision-aware head reinforcement (He et al.): the heads `vhr_heads` chooses are
    scaled by alpha at every step, prefill and decode alike. Returns (generated token ids (T,), {layer: heads})."""
    if model.family.kind != "lvlm":
        raise ValueError(f"VHR is for vision-language models; {model.name} is a {model.family.kind}")
    with_image = model.prepare(lvlm_prompt(model, prompt), images=[image])
    without = image_free_inputs(model, prompt, image, no_image)
    chosen = vhr_heads(model, with_image, without, layers, alpha)
    with mask_heads(model, [(lay, h) for lay, hs in chosen.items() for h in hs], mode="scale", factor=alpha):
        tokens = greedy(model, with_image, max_new_tokens)
    return tokens, chosen


# ---- figures of this analysis's view (also for notebooks)


def sample_image(source, title: str):
    """A sample's image as a figure (a `Note` saying why where it cannot be read)."""
    try:
        image = np.asarray(load_image(source).convert("RGB"))
    except (OSError, ValueError) as e:
        return Note(f"{title}: cannot be shown ({e})")
    fig = go.Figure(go.Image(z=image))
    fig.update_layout(title=plain(title), template=TEMPLATE, xaxis={"visible": False}, yaxis={"visible": False})
    return fig


def tvhd_along_text(tvhd: pd.DataFrame, sample: int) -> go.Figure:
    """T-VHD of each generated token of one sample (the `tvhd` table of a vhd run), in generation order."""
    part = tvhd[tvhd["sample"] == sample].sort_values("step")
    fig = go.Figure(go.Bar(x=[f"{s}: {t}" for s, t in zip(part["step"], part["token"])], y=part["tvhd"],
                           hovertemplate="%{x}<br>T-VHD %{y:.4g}<extra></extra>"))
    fig.update_layout(title=f"T-VHD along the generated text, sample {sample}", xaxis_title="generated token",
                      yaxis_title="T-VHD", template=TEMPLATE)
    return fig
