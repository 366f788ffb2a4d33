"""`sinks`: attention sinks in LLMs, encoders, ViTs and vision-language models (REFERENCES.md §3).

Per head and sample, from the kernels (nothing N×N): the attention each key receives, averaged over the
queries that can see it (Gu et al.'s α_k = key_mass / key_count, the query's attention to itself included, as
in their code); α of the first token; the largest α among keys that at least `any_min_queries` queries see (the
any-token variant: a sink need not be first; the last keys, seen by a handful of queries, are left out because
their mean is over too few rows); and the mean attention mass on segments (CLS, SEP, delimiters, registers,
image tokens, ViT high-norm tokens, visual sink tokens).

Sink_ε (Gu et al.): the percentage of (sample, layer, head) triples with α_first > ε (ε = 0.3). The default
preset "gu" is their protocol: T = 64 tokens, 100 sequences of each input kind, natural text (the tokenizer's
special tokens included), random tokens and one random token repeated (raw ids, no special tokens). Preset
"long": T = min(8192, context), 4 natural sequences. `--max-tokens` / `--samples` override either. A natural
sequence is T tokens of the texts joined by blank lines, from the start of one text: with no more sequences than
texts, the texts `chosen_prompts` picks (as summary and lookback do: the same seed reads the same texts), so a
sequence is a text cut to T tokens, as in Gu et al.'s code; with more, evenly spaced windows of the joined texts.

Massive activations (Sun et al.): per layer, the largest |x| of the residual stream leaving each block, their
positions and dimensions, and the median |x|; massive = |x| > massive_min and ≥ massive_ratio × median.

ViTs (Darcet et al.): per layer the norm of every output token; the high-norm threshold is fitted once per run
at the valley of the final layer's bimodal log-norm distribution (a two-component Gaussian mixture; none when
the distribution is not bimodal) before any sample is scored, and recorded in the plan; `high_norm_mass` is the
attention each head pays to the high-norm patch tokens.

Vision-language models (Kang et al.): sink dimensions from the first token's massive activations; φ(x) on the
residual stream entering layers 2 … L − 1; visual sink tokens (φ > τ inside an image); per head, over the text
queries after the image, the share of image attention on visual sinks and the rate of image-centric rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interp.app.figures import TEMPLATE, Note, grid_overlay, index_axis, score_by_layer
from interp.fanout import fan_out
from interp.hooks import Pass, alone
from interp.hooks.capture import capture_residual
from interp.hooks.var import FIRST_SINK_LAYER, RULES, image_centric, massive_entries, phi
from interp.kernels import call_stats
from interp.layout import TokenLayout, fixed_masking, token_layout, vision_prefix
from interp.models import Model
from interp.params import IMAGES, PROMPT, PROMPTS, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .images import BUILTIN_IMAGES, image_files, load_image
from .inputs import TEXTS, chosen_prompts, lvlm_prompt, plain_token_pool, read_prompts, special_tokens

INPUT_KINDS = ("natural", "random", "repeated")
PRESETS = {"gu": (64, 100), "long": (8192, 4)}  # (tokens, samples per input kind)
DELIMITERS = frozenset(".,;:!?\n")
DEFAULT_PROMPT = "Describe the image."
SEGMENT_COLUMNS = {
    "cls": "mean attention mass on [CLS]",
    "sep": "mean attention mass on [SEP]",
    "delimiter": "mean attention mass on delimiter tokens (. , ; : ! ? newline)",
    "register": "mean attention mass on register tokens",
    "high_norm": "mean attention mass on high-norm patch tokens (Darcet et al.)",
    "image": "mean attention mass of the text queries after the image on image tokens",
    "visual_sink": "mean attention mass of the text queries after the image on visual sink tokens",
}


@dataclass(frozen=True)
class SinksParams(Params):
    analysis = "sinks"
    preset: str = param("gu", "gu (T = 64, 100 sequences per input kind) or long (T = min(8192, context), 4 natural "
                        "sequences)", metavar="NAME", choices=tuple(PRESETS))
    inputs: list[str] | None = param(None, "input kinds, comma-separated (default all three for text models)",
                                     metavar="K,K", choices=INPUT_KINDS)
    epsilon: float = param(0.3, "Sink_eps threshold on α_first", metavar="X", low=0)
    any_min_queries: int = param(16, "any-token sinks count keys seen by at least N queries", metavar="N", low=1)
    prompts: str | None = param(None, PROMPTS)
    images: str | None = param(None, IMAGES)
    prompt: str = param(DEFAULT_PROMPT, PROMPT)
    top_activations: int = param(8, "largest residual entries kept per layer", metavar="N", low=1)
    massive_min: float = param(100.0, "massive activations exceed X", metavar="X", low=0)
    massive_ratio: float = param(1000.0, "... and X times the layer median", metavar="X", low=0)
    norm_threshold: float | None = param(None, "ViT high-norm threshold (default: fitted at the valley)", metavar="X")
    sink_dims: list[int] | None = param(None, "LVLM sink dimensions (default: the first token's massive dims)",
                                        metavar="D,D", low=0)
    tau: float = param(20.0, "phi threshold for visual sink tokens", metavar="X")
    rho: float = param(0.5, "image-centric visual-sink share threshold", metavar="X", low=0, high=1)
    min_image_attention: float = param(0.2, "image-centric heads' attention to the image", metavar="X", low=0, high=1)
    image_centric_rule: str = param("code", "code (portion <= rho) or paper", metavar="RULE", choices=RULES)

    def __post_init__(self):
        if self.inputs == []:
            raise ValueError(f"sinks parameter inputs: give some of {', '.join(INPUT_KINDS)}")
        if self.sink_dims is not None:
            object.__setattr__(self, "sink_dims", sorted(set(self.sink_dims)))


class Sinks(Analysis):
    name = "sinks"
    description = "attention sinks: per-key attention received, Sink_ε, massive activations, visual sinks"
    kinds = ("llm", "encoder", "vit", "lvlm")
    scores = {
        "first_token_mass": "α of the first token: attention it receives, averaged over the queries (natural input)",
        "sink_rate": "% of natural samples with α_first > ε (Gu et al.'s Sink_ε for this head)",
        "any_sink_rate": "% of natural samples where some key (seen by ≥ any_min_queries queries) has α > ε",
        "sink_rate_random": "% of random-token samples with α_first > ε",
        "sink_rate_repeated": "% of repeated-token samples with α_first > ε",
        **{f"{k}_mass": v for k, v in SEGMENT_COLUMNS.items()},
        "visual_sink_portion": "share of the image attention on visual sink tokens (text queries after the image)",
        "image_centric_rate": "% of text queries after the image for which the head is image-centric (Kang et al.)",
    }
    Params = SinksParams
    roles = (
        Role("sink", "sink_rate", threshold=50.0,
             description="sink head: α_first > ε (Gu et al.'s Sink_ε) on more than 50 % of the natural samples"),
        Role("image_centric", "image_centric_rate", threshold=50.0,
             description="image-centric head (Kang et al.): image-centric for more than 50 % of the text queries"),
    )
    sample_columns = {"sink_rate": "first_token_mass", "any_sink_rate": "top_key_mass",
                      "sink_rate_random": "first_token_mass", "sink_rate_repeated": "first_token_mass"}
    describe = ("input", "n_tokens")
    sample_tables = ("massive", "norms", "phi")

    # ---- parameters and columns

    def input_kinds(self, model: Model, params: dict) -> list[str]:
        if model.family.kind in ("vit", "lvlm"):
            if params["inputs"] not in (None, ["natural"]):
                raise ValueError(f"{model.name} reads images: random and repeated token inputs apply to text models")
            return ["natural"]
        return params["inputs"] or list(INPUT_KINDS)

    def read_paths(self, model: Model, params: dict) -> tuple[str, ...]:
        """Images for vision models; prompts for text models, when natural text is among the inputs."""
        if model.family.kind in ("vit", "lvlm"):
            return ("images",)
        return ("prompts",) if "natural" in self.input_kinds(model, params) else ()

    def score_columns(self, model: Model, params: dict) -> dict[str, str]:
        kind, kinds = model.family.kind, self.input_kinds(model, params)
        segments = {"llm": ["delimiter"], "encoder": ["cls", "sep", "delimiter"], "lvlm": ["image", "visual_sink"],
                    "vit": [s for s in ("cls", "register") if s in vision_prefix(model)] + ["high_norm"]}[kind]
        cols = ["first_token_mass", "sink_rate", "any_sink_rate"]
        cols += [f"sink_rate_{k}" for k in kinds if k != "natural"] + [f"{s}_mass" for s in segments]
        if kind == "lvlm":
            cols += ["visual_sink_portion", "image_centric_rate"]
        return {c: self.scores[c] for c in cols}

    # ---- the plan

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        if options.backend == "transformer-lens":  # checked before any work: the run would fail after a sample
            raise ValueError("the sinks analysis reads the residual stream of the model itself, which the "
                             "transformer-lens backend runs as a bridged copy: use --backend hf or nnsight")
        kinds = self.input_kinds(model, params)
        if model.family.kind in ("vit", "lvlm"):
            return self._image_plan(model, options, params)
        n_tokens, n = _sizes(model, options, params)
        prefix, suffix = special_tokens(model.tokenizer)
        body = n_tokens - len(prefix) - len(suffix)
        if body < 1:
            raise ValueError(f"--max-tokens {n_tokens} leaves no room for text beside {model.name}'s special tokens")
        rng = random.Random(options.seed)
        plan = []
        for kind in kinds:
            if kind == "natural":
                plan += [{"input": kind, "offset": o, "tokens": n_tokens}
                         for o in _natural_offsets(model, params, n, body, options.seed)]
            else:
                pool = plain_token_pool(model.tokenizer)
                plan += [{"input": kind, "seed": rng.randrange(2**31), "token": rng.choice(pool), "tokens": n_tokens}
                         for _ in range(n)]
        return plan

    def _image_plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        sources = [str(p) for p in image_files(params["images"])] if params["images"] else list(range(BUILTIN_IMAGES))
        n = options.samples if options.samples is not None else len(sources)
        if not 1 <= n <= len(sources):
            raise ValueError(f"--samples {n}: there are {len(sources)} images (give 1..{len(sources)})")
        chosen = sorted(random.Random(options.seed).sample(range(len(sources)), n)) if n < len(sources) else range(n)
        plan = [{"input": "natural", "image": sources[i]} for i in chosen]
        if model.family.kind == "vit":
            threshold = params["norm_threshold"]
            fit = {"threshold": threshold, "source": "given"} if threshold is not None else \
                fit_norm_threshold(_final_patch_norms(model, [p["image"] for p in plan]))
            for p in plan:
                p["high_norm"] = fit
        return plan

    # ---- one sample

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        return _inputs(model, sample, params)[0]

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> dict[str, pd.DataFrame]:
        return alone(model, self.sample_pass(model, sample, options, params), options, progress)

    def sample_pass(self, model: Model, sample: dict, options: Options, params: dict) -> Pass:
        """One sample's part of a forward pass (`interp.hooks.Pass`); it finishes as `score_sample`'s tables."""
        inputs, tokens = _inputs(model, sample, params)
        columns = [c.removesuffix("_mass") for c in self.score_columns(model, params) if c.endswith("_mass")
                   and c != "first_token_mass"]
        recorder = RECORDERS[model.family.kind](model, sample, params, inputs, tokens, columns)
        return Pass(inputs, recorder.probe, lambda: {"samples": pd.concat(recorder.rows, ignore_index=True),
                                                     **recorder.tables()},
                    stats=recorder.stats_request, residual=recorder.residual)

    # ---- the run

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        eps = params["epsilon"]
        keys = ["layer", "head", "kv_head"]
        s = samples.assign(sink=100.0 * (samples["first_token_mass"] > eps),
                           any_sink=100.0 * (samples["top_key_mass"] > eps))
        natural = s[s["input"] == "natural"] if (s["input"] == "natural").any() else s
        mass_cols = [c for c in s.columns if c.endswith("_mass") and c not in ("top_key_mass",)]
        extra = [c for c in ("visual_sink_portion", "image_centric_rate") if c in s.columns]
        heads = natural.groupby(keys)[mass_cols + extra + ["sink", "any_sink"]].mean()
        heads = heads.rename(columns={"sink": "sink_rate", "any_sink": "any_sink_rate"})
        for kind in ("random", "repeated"):
            part = s[s["input"] == kind]
            if len(part):
                heads[f"sink_rate_{kind}"] = part.groupby(keys)["sink"].mean()
        heads = heads[[c for c in self.scores if c in heads.columns]]
        return heads.reset_index().sort_values(["layer", "head"], ignore_index=True)

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame,
                 options: Options, params: dict, progress: Progress,
                 extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        tables = {"sink_rates": sink_rates(samples, params["epsilon"])}
        if "massive" in extras:
            tables["massive_layers"] = massive_layers(extras["massive"])
        if "norms" in extras:
            tables["norm_histogram"] = norm_histogram(extras["norms"])
            tables["high_norm"], tables["high_norm_fit"] = high_norm_tokens(extras["norms"], plan[0]["high_norm"])
        if "phi" in extras:
            tables["visual_sinks"] = visual_sinks(extras["phi"], params["tau"])
        return tables

    def report(self, result) -> list[str]:
        lines = []
        rates = result.tables.get("sink_rates")
        eps = self.stored_params(result.meta)["epsilon"]
        if rates is not None:
            overall = rates[rates["layer"] == -1]
            first = ", ".join(f"{r.input} {r.first_token:.1f} %" for r in overall.itertuples())
            anyt = ", ".join(f"{r.input} {r.any_token:.1f} %" for r in overall.itertuples())
            lines.append(f"Sink_{eps:g} (first token, % of sample × layer × head): {first}")
            lines.append(f"Sink_{eps:g} (any token): {anyt}")
        ml = result.tables.get("massive_layers")
        if ml is not None and len(ml):
            top = ml.loc[ml["top_abs"].idxmax()]
            lines.append(f"largest residual activation: |x| = {top.top_abs:.1f} (layer {int(top.layer)}, dim "
                         f"{int(top.top_dim)}, position {int(top.top_position)}), {top.ratio:.0f}× the layer median")
            found = ml[ml["massive_dims"] != ""]
            lines.append("massive activations: " + ("none at these thresholds" if found.empty else
                         f"layers {int(found.layer.min())}–{int(found.layer.max())}, dims "
                         f"{sorted({d for s in found.massive_dims for d in s.split(',')}, key=int)}"))
        hn = result.tables.get("high_norm_fit")
        if hn is not None and len(hn):
            r = hn.iloc[0]
            lines.append("high-norm tokens: " + ("none (the final norms are not bimodal)" if pd.isna(r.threshold) else
                         f"threshold {r.threshold:.2f} ({r.source}), {r.percent:.2f} % of patch tokens"))
        vs = result.tables.get("visual_sinks")
        if vs is not None and len(vs):
            lines.append(f"sink dimensions {vs['dims'].iloc[0] or 'none'}; visual sink tokens: "
                         f"{vs['percent_of_image'].mean():.1f} % of image tokens on average over layers "
                         f"{int(vs.layer.min())}–{int(vs.layer.max())}")
        return lines

    def view(self, result) -> list:
        """Sink rates and first-token mass per layer, massive activations, ViT token norms, visual sinks per layer,
        and the high-norm / visual sink tokens of the first sample over its image."""
        t, out, tau = result.tables, [], self.stored_params(result.meta)["tau"]
        if "sink_rates" in t:
            out.append(sink_rates_by_layer(t["sink_rates"]))
        out.append(score_by_layer(result.heads, "first_token_mass"))
        if "massive_layers" in t:
            out.append(massive_activations(t["massive_layers"]))
        if "norm_histogram" in t:
            fit = t.get("high_norm_fit")
            out.append(norm_histogram_figure(t["norm_histogram"], None if fit is None else fit["threshold"].iloc[0]))
        if "visual_sinks" in t:
            vs = t["visual_sinks"]
            if vs.empty or not vs["dims"].iloc[0]:
                out.append(Note("no sink dimensions found (the first token has no massive activation at these "
                                "thresholds): no image token can be a visual sink"))
            elif not vs["visual_sinks"].any():
                out.append(Note(f"no visual sink tokens found: no image token has φ > τ = {tau:g} on the sink "
                                f"dimensions {vs['dims'].iloc[0]}"))
            else:
                out.append(visual_sinks_by_layer(vs))
        return out + _token_grids(result, tau)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _sizes(model: Model, options: Options, params: dict) -> tuple[int, int]:
    tokens, n = PRESETS[params["preset"]]
    limit = model.max_tokens
    tokens = options.max_tokens or (min(tokens, limit) if limit else tokens)
    if tokens < 2 or (limit and tokens > limit):
        raise ValueError(f"--max-tokens {tokens}: give 2..{limit or 'any'} for {model.name}")
    n = options.samples if options.samples is not None else n
    if n < 1:
        raise ValueError(f"--samples {n}: give at least 1")
    return tokens, n


def _natural_prompts(model: Model, params: dict) -> list[list[int]]:
    """The natural texts (built-in or `prompts`, read again each time, so a run checks them against what it
    recorded), each as its token ids without special tokens."""
    return [_tokens(model.tokenizer, t) for t in (read_prompts(params["prompts"]) if params["prompts"] else TEXTS)]


def _natural_stream(model: Model, params: dict) -> tuple[list[int], list[int]]:
    """The natural texts as one token stream (each text's own tokens, then a blank line's), and where each begins."""
    stream, starts, blank = [], [], _tokens(model.tokenizer, "\n\n")
    for tokens in _natural_prompts(model, params):
        starts.append(len(stream))
        stream += tokens + blank
    return stream, starts


def _natural_offsets(model: Model, params: dict, n: int, body: int, seed: int) -> list[int]:
    """Where in the stream each of `n` natural samples of `body` text tokens begins: at the start of each of the
    prompts `chosen_prompts` picks (as summary and lookback pick theirs) when there are enough prompts, so that a
    sample is a prompt cut to T tokens, as Gu et al.'s; else evenly spaced windows of the whole stream."""
    stream, starts = _natural_stream(model, params)
    if n <= len(starts):
        return [starts[i] for i in chosen_prompts(len(starts), n, seed)]
    span = max(len(stream) - body, 0)
    return [round(i * span / max(n - 1, 1)) for i in range(n)]


@lru_cache(maxsize=256)
def _tokens(tokenizer, text: str) -> list[int]:
    """The text's token ids, tokenized once per tokenizer and text."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _inputs(model: Model, sample: dict, params: dict) -> tuple[dict, list[str]]:
    """Model inputs of one sample, and the text of each token ("" for image patches)."""
    if "image" in sample:
        image = load_image(sample["image"])
        if model.family.kind == "vit":
            return fixed_masking(model, model.prepare(images=image)), []
        inputs = model.prepare(lvlm_prompt(model, params["prompt"]), images=[image])
    else:
        n = sample["tokens"]
        if sample["input"] == "natural":
            prefix, suffix = special_tokens(model.tokenizer)
            stream, body = _natural_stream(model, params)[0], n - len(prefix) - len(suffix)
            ids = (stream * (body // max(len(stream), 1) + 2))[sample["offset"]:sample["offset"] + body]
            ids = prefix + ids + suffix
        elif sample["input"] == "random":
            pool = plain_token_pool(model.tokenizer)
            rng = random.Random(sample["seed"])
            ids = [rng.choice(pool) for _ in range(n)]
        else:
            ids = [sample["token"]] * n
        model.check_length(len(ids))
        ids_t = torch.tensor([ids], device=model.device)
        inputs = {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t)}
    ids = inputs["input_ids"][0].tolist()
    return inputs, [model.tokenizer.decode([i]) for i in ids]


WANTED = ("key_mass", "key_count", "segment_mass")  # what every layer's probe asks of the kernels


class _Recorder:
    """One sample of an LLM or an encoder, layer by layer: per head the attention received per key (α), the
    first-token and top-key mass, the mass on each segment; per layer the massive-activation rows. The ViT and
    LVLM recorders below add what their kind has."""

    extra_segments: tuple[str, ...] = ()  # segment ids the recorder adds beyond the layout's

    def __init__(self, model: Model, sample: dict, params: dict, inputs: dict, tokens: list[str],
                 columns: list[str]):
        self.model, self.sample, self.params, self.tokens, self.columns = model, sample, params, tokens, columns
        self.layout = token_layout(model, inputs)
        self.prepare(inputs)
        self.n = self.layout.segments.shape[1]
        self.names = list(self.layout.names) + list(self.extra_segments)
        self.min_queries = min(params["any_min_queries"], self.n)
        self.dims = torch.tensor(params["sink_dims"] or [], dtype=torch.long)
        self.massive: list[pd.DataFrame] = []
        self.rows: list[pd.DataFrame] = []
        self.stats_request = self.request()

    def prepare(self, inputs: dict) -> None:
        """Name what the kind's layout lacks (here: the delimiter tokens)."""
        _add_delimiters(self.layout, self.tokens)

    def request(self) -> dict | None:
        """The `call_stats` arguments of every layer, computed inside the model's call where they can be."""
        return dict(segments=self.layout.segments.to(self.model.device), n_segments=len(self.names), stats=WANTED)

    def segments(self, layer: int) -> torch.Tensor:
        return self.layout.segments

    def queries(self, call) -> slice:
        """The queries whose masses count: every one that can see more than the first token."""
        return slice(1 if call.causal else 0, None)

    def extra(self, mass: torch.Tensor, segments: torch.Tensor) -> dict:
        return {}

    def residual(self, layer: int, hidden: torch.Tensor) -> None:
        self.massive.append(_massive_rows(layer, hidden, self.params, self.tokens, self.sample["input"]))

    def probe(self, call) -> None:
        segments = self.segments(call.layer)
        request = self.stats_request or dict(segments=segments.to(call.q.device), n_segments=len(self.names),
                                             stats=WANTED)
        st = call_stats(call, **request)
        alpha = st.key_mean[0].float()                                       # (H, Nk)
        top = alpha.masked_fill(~(st.key_count[0] >= self.min_queries), -1.0).max(-1)
        mass = st.segment_mass[0, :, self.queries(call)].float()            # (H, Nq', S)
        per_segment = {}
        for c in self.columns:
            ids = [self.names.index(s) for s in ((c, "visual_sink") if c == "image" else (c,)) if s in self.names]
            per_segment[f"{c}_mass"] = (mass[..., ids].sum(-1).mean(-1) if ids
                                        else torch.zeros(alpha.shape[0])).cpu().numpy()
        self.rows.append(head_rows(call.layer, call.heads, call.kv_heads, input=self.sample["input"], n_tokens=self.n,
                                   first_token_mass=alpha[:, 0].cpu().numpy(), top_key=top.indices.cpu().numpy(),
                                   top_key_mass=top.values.cpu().numpy(), **per_segment,
                                   **self.extra(mass, segments)))

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"massive": pd.concat(self.massive, ignore_index=True)}


class _ViTRecorder(_Recorder):
    """A ViT: also the high-norm tokens (Darcet et al.) and every layer's token norms, with each token's cell on the
    image's grid (row, col; -1 off the grid) and the grid's shape (grid_rows, grid_cols)."""

    def prepare(self, inputs: dict) -> None:
        grid = self.layout.grids[0]
        positions, cells = grid.kept()
        self.cells = np.full((self.layout.segments.shape[1], 2), -1)   # (N, 2) (row, col) of each token
        self.cells[positions.cpu().numpy()] = cells.long().numpy()
        self.grid_shape = grid.shape
        fit = self.sample["high_norm"]
        patches = self.layout.mask("image")[0]
        if fit["threshold"] is not None:
            final = _final_norms(self.model, inputs)
            self.layout.add_positions("high_norm", patches.cpu() & (final > fit["threshold"]))
        self.norms: list[pd.DataFrame] = []

    def residual(self, layer: int, hidden: torch.Tensor) -> None:
        super().residual(layer, hidden)
        self.norms.append(pd.DataFrame({"layer": layer, "position": np.arange(self.n),
                                        "segment": [self.layout.names[i] for i in self.layout.segments[0].tolist()],
                                        "norm": hidden[0].float().norm(dim=-1).cpu().numpy(),
                                        "row": self.cells[:, 0], "col": self.cells[:, 1],
                                        "grid_rows": self.grid_shape[0], "grid_cols": self.grid_shape[1]}))

    def tables(self) -> dict[str, pd.DataFrame]:
        return {**super().tables(), "norms": pd.concat(self.norms, ignore_index=True)}


class _LVLMRecorder(_Recorder):
    """A vision-language model: also the visual sink tokens of each layer (φ > τ on the sink dimensions, Kang et
    al.), which change the segments layer by layer, and the text queries' portion of image attention on them."""

    extra_segments = ("visual_sink",)

    def prepare(self, inputs: dict) -> None:
        self.visual_id = len(self.layout.names)
        self.after_image = _after_image(self.layout)
        self.layer_segments: dict[int, torch.Tensor] = {}
        self.phis: list[pd.DataFrame] = []
        self.own_massive: list[pd.DataFrame] = []
        self.found_dims = (_sink_dims_and_massive(self.model, inputs, self.params, self.tokens, self.own_massive)
                           if self.params["sink_dims"] is None else None)

    def request(self) -> dict | None:
        return None  # the segments change from layer to layer: asked for by each probe

    def segments(self, layer: int) -> torch.Tensor:
        return self.layer_segments.get(layer, self.layout.segments)

    def queries(self, call) -> slice:
        return self.after_image  # the text after the image

    def residual(self, layer: int, hidden: torch.Tensor) -> None:
        if self.params["sink_dims"] is not None:
            super().residual(layer, hidden)
        if FIRST_SINK_LAYER <= layer + 1 < self.model.n_layers():
            f = phi(hidden, self.sink_dims)[0].cpu()
            image = self.layout.mask("image")[0].cpu()
            seg = self.layout.segments.clone()
            seg[0, (image & (f > self.params["tau"])).to(seg.device)] = self.visual_id
            self.layer_segments[layer + 1] = seg
            self.phis.append(pd.DataFrame({"layer": layer + 1, "position": np.arange(self.n),
                                           "segment": [self.layout.names[i] for i in self.layout.segments[0].tolist()],
                                           "phi": f.numpy()}))

    @property
    def sink_dims(self) -> torch.Tensor:
        return self.found_dims if self.found_dims is not None else self.dims

    def extra(self, mass: torch.Tensor, segments: torch.Tensor) -> dict:
        image, sink = self.names.index("image"), self.names.index("visual_sink")
        on_image = mass[..., [image, sink]].sum(-1)
        n_image = int(self.layout.mask("image").sum())  # the reference code adds 1e-6 per image token
        portion = mass[..., sink] / (on_image + 1e-6 * n_image)
        centric = image_centric(portion, on_image, self.params["rho"], self.params["min_image_attention"],
                                self.params["image_centric_rule"])
        has_sinks = bool((segments == sink).any())
        return {"visual_sink_portion": portion.mean(-1).cpu().numpy(),
                "image_centric_rate": 100 * (centric & has_sinks).float().mean(-1).cpu().numpy()}

    def tables(self) -> dict[str, pd.DataFrame]:
        massive = self.own_massive + self.massive
        tables = {"massive": pd.concat(massive, ignore_index=True)}
        if self.phis:
            tables["phi"] = pd.concat(self.phis, ignore_index=True).assign(
                dims=",".join(map(str, self.sink_dims.tolist())))
        return tables


RECORDERS = {"llm": _Recorder, "encoder": _Recorder, "vit": _ViTRecorder, "lvlm": _LVLMRecorder}


def _add_delimiters(layout: TokenLayout, tokens: list[str]) -> None:
    """Mark the delimiter tokens (. , ; : ! ? newline) that are not already special."""
    text_id = layout.id("text")
    for i, t in enumerate(tokens):
        s = t.strip(" ")
        if s and set(s) <= DELIMITERS and int(layout.segments[0, i]) == text_id:
            layout.add_span("delimiter", i, i + 1, 0)


def _after_image(layout: TokenLayout) -> slice:
    """The text queries after the last image token."""
    image = layout.mask("image")[0]
    if not bool(image.any()):
        raise ValueError("the input has no image tokens: the processor dropped the image")
    return slice(int(image.nonzero().max()) + 1, None)


# ---------------------------------------------------------------------------------------------------------
# Residual stream


def _massive_rows(layer: int, hidden: torch.Tensor, params: dict, tokens: list[str], kind: str) -> pd.DataFrame:
    """The layer's top |x| entries (rank, value, position, dim, token), its median |x|, and which are massive."""
    a = hidden[0].detach().float()
    flat = a.abs().flatten()
    k = min(params["top_activations"], flat.numel())
    top = flat.topk(k)
    pos, dim = top.indices // a.shape[-1], top.indices % a.shape[-1]
    median = float(flat.median())
    values = a.flatten()[top.indices]
    return pd.DataFrame({
        "input": kind, "layer": layer, "rank": np.arange(k), "value": values.cpu().numpy(), "abs": top.values.cpu().numpy(),
        "position": pos.cpu().numpy(), "dim": dim.cpu().numpy(),
        "token": [tokens[int(p)] if tokens else "" for p in pos], "median": median,
        "massive": ((top.values > params["massive_min"]) & (top.values >= params["massive_ratio"] * median)).cpu().numpy(),
    })


def _sink_dims_and_massive(model: Model, inputs: dict, params: dict, tokens: list[str], massive: list) -> torch.Tensor:
    """One residual-only pass: the massive-activation rows of every layer, and the sink dimensions (the first
    token's massive dimensions in any layer)."""
    found: set[int] = set()

    def probe(layer: int, hidden: torch.Tensor) -> None:
        massive.append(_massive_rows(layer, hidden, params, tokens, "natural"))
        entries = massive_entries(hidden[:1], params["massive_min"], params["massive_ratio"])
        found.update(int(d) for d in entries[entries[:, 1] == 0, 2])

    with torch.no_grad(), capture_residual(model, probe):
        model.hf(**inputs)
    return torch.tensor(sorted(found), dtype=torch.long)


def _final_norms(model: Model, inputs: dict) -> torch.Tensor:
    """(N,) norm of every token leaving the last block."""
    out = {}
    last = model.n_layers() - 1
    with torch.no_grad(), capture_residual(model, lambda i, h: out.setdefault("h", h), layers=[last]):
        model.hf(**inputs)
    return out["h"][0].float().norm(dim=-1).cpu()


def _final_patch_norms(model: Model, images: list) -> np.ndarray:
    """The final-layer norms of every patch token of the images (the calibration set of the threshold; the forward
    passes spread over a cluster's workers)."""
    return np.concatenate(fan_out(patch_norms, model, images))


def patch_norms(model: Model, source) -> np.ndarray:
    """The final-layer norm of every patch token of one image."""
    inputs = fixed_masking(model, model.prepare(images=load_image(source)))
    patches = token_layout(model, inputs).mask("image")[0].cpu()
    return _final_norms(model, inputs)[patches].numpy()


def fit_norm_threshold(norms: np.ndarray, min_separation: float = 2.0) -> dict:
    """The valley between the two modes of a token-norm distribution (Darcet et al.), fitted on log norms by a
    two-component Gaussian mixture (EM). Returns {"threshold", "source", "separation", "low", "high"}:
    threshold None when the fit is not bimodal (Ashman's D < min_separation, or the upper mode is empty)."""
    x = np.log(np.maximum(np.asarray(norms, dtype=np.float64), 1e-12))
    mu = np.quantile(x, [0.5, 0.995])
    sd = np.full(2, x.std() / 2 + 1e-6)
    w = np.array([0.9, 0.1])
    for _ in range(200):
        dens = w / (sd * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((x[:, None] - mu) / sd) ** 2)
        resp = dens / np.maximum(dens.sum(1, keepdims=True), 1e-300)
        nk = resp.sum(0)
        if nk.min() < 1:
            break
        w, mu = nk / len(x), (resp * x[:, None]).sum(0) / nk
        sd = np.sqrt((resp * (x[:, None] - mu) ** 2).sum(0) / nk) + 1e-6
    lo, hi = np.argsort(mu)
    separation = float(np.sqrt(2) * abs(mu[hi] - mu[lo]) / np.sqrt(sd[lo] ** 2 + sd[hi] ** 2))
    fit = {"threshold": None, "source": "valley of the final-layer log-norm mixture", "separation": separation,
           "low": float(np.exp(mu[lo])), "high": float(np.exp(mu[hi]))}
    if separation < min_separation or nk.min() < 1:
        return fit
    grid = np.linspace(mu[lo], mu[hi], 2001)
    dens = w / (sd * np.sqrt(2 * np.pi)) * np.exp(-0.5 * ((grid[:, None] - mu) / sd) ** 2)
    fit["threshold"] = float(np.exp(grid[np.argmin(dens.sum(1))]))
    return fit


# ---------------------------------------------------------------------------------------------------------
# Run-level tables


def sink_rates(samples: pd.DataFrame, epsilon: float) -> pd.DataFrame:
    """Gu et al.'s Sink_ε per input kind, per layer and over all layers (layer −1): the % of (sample, layer, head)
    triples whose first token (any token) receives α > ε."""
    s = samples.assign(first_token=100.0 * (samples["first_token_mass"] > epsilon),
                       any_token=100.0 * (samples["top_key_mass"] > epsilon))
    per_layer = s.groupby(["input", "layer"], as_index=False).agg(
        first_token=("first_token", "mean"), any_token=("any_token", "mean"), triples=("first_token", "size"))
    overall = s.groupby("input", as_index=False).agg(
        first_token=("first_token", "mean"), any_token=("any_token", "mean"), triples=("first_token", "size"))
    order = {k: i for i, k in enumerate(INPUT_KINDS)}
    out = pd.concat([overall.assign(layer=-1), per_layer], ignore_index=True)
    return out.sort_values(["input", "layer"], key=lambda c: c.map(order) if c.name == "input" else c,
                           ignore_index=True)[["input", "layer", "first_token", "any_token", "triples"]]


def massive_layers(massive: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over the natural samples (all samples when there are none): the largest |x| and where it sits,
    the mean median |x|, their ratio, and the dimensions (and positions) of the massive entries."""
    if (massive["input"] == "natural").any():
        massive = massive[massive["input"] == "natural"]
    rows = []
    for layer, g in massive.groupby("layer"):
        top = g.loc[g["abs"].idxmax()]
        m = g[g["massive"]]
        rows.append({"layer": int(layer), "top_abs": float(top["abs"]), "top_dim": int(top.dim),
                     "top_position": int(top.position), "top_token": top.token, "median": float(g["median"].mean()),
                     "ratio": float(top["abs"] / max(g["median"].mean(), 1e-12)),
                     "massive_dims": ",".join(str(d) for d in sorted(m["dim"].unique())),
                     "massive_positions": ",".join(str(p) for p in sorted(m["position"].unique()))})
    return pd.DataFrame(rows)


def norm_histogram(norms: pd.DataFrame, bins: int = 40) -> pd.DataFrame:
    """Per layer, the histogram of output-token norms over all images (`bins` equal bins between the layer's
    smallest and largest norm)."""
    rows = []
    for layer, g in norms.groupby("layer"):
        counts, edges = np.histogram(g["norm"], bins=bins)
        rows.append(pd.DataFrame({"layer": int(layer), "low": edges[:-1], "high": edges[1:], "count": counts}))
    return pd.concat(rows, ignore_index=True)


def high_norm_tokens(norms: pd.DataFrame, fit: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The high-norm patch tokens of the final layer, one row each (sample, position, norm), and the fit: the
    threshold, how it was set, the mixture's separation, and the share of patch tokens above it."""
    last = norms[(norms["layer"] == norms["layer"].max()) & norms["segment"].isin(["image", "high_norm"])]
    threshold = fit["threshold"]
    high = last[last["norm"] > threshold] if threshold is not None else last.iloc[:0]
    summary = pd.DataFrame({"threshold": [threshold], "source": [fit["source"]], "separation": [fit.get("separation")],
                            "high_tokens": [len(high)], "patch_tokens": [len(last)],
                            "percent": [100.0 * len(high) / max(len(last), 1)]})
    return high[["sample", "position", "norm"]].reset_index(drop=True), summary


def visual_sinks(phis: pd.DataFrame, tau: float) -> pd.DataFrame:
    """Per layer: how many image tokens are visual sinks (φ > τ), and how many text tokens are sinks."""
    p = phis.assign(sink=phis["phi"] > tau, is_image=phis["segment"] == "image")
    g = p.groupby("layer")
    out = pd.DataFrame({
        "visual_sinks": g.apply(lambda d: int((d.sink & d.is_image).sum()), include_groups=False),
        "image_tokens": g.apply(lambda d: int(d.is_image.sum()), include_groups=False),
        "text_sinks": g.apply(lambda d: int((d.sink & ~d.is_image).sum()), include_groups=False)}).reset_index()
    out["percent_of_image"] = 100.0 * out["visual_sinks"] / out["image_tokens"].clip(lower=1)
    out["dims"] = phis["dims"].iloc[0] if len(phis) else ""
    return out


# ---- figures of this analysis's view (also for notebooks)


def sink_rates_by_layer(rates: pd.DataFrame) -> go.Figure:
    """Sink_ε per layer for each input kind (the `sink_rates` table of a sinks run)."""
    per_layer = rates[rates["layer"] >= 0]
    fig = go.Figure()
    for kind, part in per_layer.groupby("input", sort=False):
        fig.add_trace(go.Scatter(x=part["layer"], y=part["first_token"], mode="lines+markers",
                                 name=f"{kind}, first token"))
        fig.add_trace(go.Scatter(x=part["layer"], y=part["any_token"], mode="lines", line={"dash": "dot"},
                                 name=f"{kind}, any token"))
    fig.update_layout(title="attention-sink rate per layer (Sink_ε, % of heads × samples)", xaxis_title="layer",
                      yaxis_title="%", template=TEMPLATE, xaxis=index_axis(per_layer["layer"]))
    return fig


def massive_activations(layers: pd.DataFrame) -> go.Figure:
    """The largest |activation| of each layer's output against the layer median (log scale), with the
    dimension and token that hold it (the `massive_layers` table of a sinks run)."""
    hover = "layer %{x}<br>|x| %{y:.4g}<br>dim %{customdata[0]}, token “%{customdata[1]}”<extra></extra>"
    fig = go.Figure([
        go.Bar(x=layers["layer"], y=layers["top_abs"], name="largest |x|", hovertemplate=hover,
               customdata=layers[["top_dim", "top_token"]].to_numpy()),
        go.Scatter(x=layers["layer"], y=layers["median"].abs(), mode="lines+markers", name="median |x|"),
    ])
    fig.update_layout(title="massive activations per layer", xaxis_title="layer", yaxis_title="|activation|",
                      yaxis_type="log", template=TEMPLATE, xaxis=index_axis(layers["layer"]))
    return fig


def norm_histogram_figure(hist: pd.DataFrame, threshold: float | None = None) -> go.Figure:
    """The last layer's token norms of a ViT (from the `norm_histogram` table), with the high-norm threshold."""
    last = hist[hist["layer"] == hist["layer"].max()]
    fig = go.Figure(go.Bar(x=(last["low"] + last["high"]) / 2, y=last["count"], name="tokens",
                           width=(last["high"] - last["low"]).to_numpy()))
    if threshold is not None:
        fig.add_vline(x=threshold, line={"color": "#e4572e", "dash": "dash"}, annotation_text="high-norm threshold")
    fig.update_layout(title=f"output token norms, layer {int(last['layer'].iloc[0])}", xaxis_title="‖x‖",
                      yaxis_title="tokens", template=TEMPLATE)
    return fig


def visual_sinks_by_layer(table: pd.DataFrame) -> go.Figure:
    """Share of image tokens that are visual sinks (φ > τ) per layer (the `visual_sinks` table)."""
    fig = go.Figure(go.Bar(x=table["layer"], y=table["percent_of_image"], customdata=table[["visual_sinks",
                           "image_tokens"]].to_numpy(), hovertemplate="layer %{x}: %{y:.1f}% (%{customdata[0]} of "
                                                                      "%{customdata[1]} image tokens)<extra></extra>"))
    fig.update_layout(title="visual sink tokens per layer", xaxis_title="layer", yaxis_title="% of image tokens",
                      template=TEMPLATE, xaxis=index_axis(table["layer"]))
    return fig


def _token_grids(result, tau: float) -> list[go.Figure]:
    """ViT high-norm tokens and LVLM visual sink tokens of the first sample, over its image. ViT tokens sit at their
    recorded grid cells (cells without a token, ViT-MAE's masked patches, blank); LVLM image tokens (and ViT runs
    stored without cells) are drawn only when they form a square."""
    out = []
    for table, value, label in (("norms", "norm", "‖x‖ (last layer)"), ("phi", "phi", "φ")):
        if table not in result.tables:
            continue
        d = result.tables[table]
        layer = d["layer"].max() if table == "norms" else _busiest_layer(d, tau)
        rows = d[(d["sample"] == d["sample"].min()) & (d["layer"] == layer) &
                 d["segment"].isin(["image", "high_norm", "visual_sink"])].sort_values("position")
        if rows.empty:
            continue
        if "row" in rows:
            values = np.full((int(rows["grid_rows"].iloc[0]), int(rows["grid_cols"].iloc[0])), np.nan)
            values[rows["row"].to_numpy(), rows["col"].to_numpy()] = rows[value].to_numpy(float)
        else:
            side = int(round(len(rows) ** 0.5))
            if side * side != len(rows):
                continue  # not a square grid: drawn only as the per-layer counts
            values = rows[value].to_numpy(float).reshape(side, side)
        sample = int(d["sample"].min())
        try:
            image = np.asarray(load_image(result.kept_plan[sample]["image"]).convert("RGB"))
        except (ValueError, KeyError):
            image = None
        what = "high-norm tokens" if table == "norms" else f"visual sink tokens (φ > τ) at layer {layer}"
        out.append(grid_overlay(values, image,
                                title=f"sample {sample}: {what}", label=label, colorscale="Magma"))
    return out


def _busiest_layer(phi: pd.DataFrame, tau: float) -> int:
    """The layer with the most image tokens above τ."""
    image = phi[phi["segment"] == "image"]
    counts = (image["phi"] > tau).groupby(image["layer"]).sum()
    return int(counts.idxmax()) if len(counts) else int(phi["layer"].min())
