"""`summary`: per-head attention statistics averaged over a set of natural texts.

For every head: mean attention entropy (nats), mean max-probability, mean attention distance (expected
|query − key| in tokens) and mean attention mass on the first token. Averages are over query positions of all
samples (each position weighs the same). In causal models the first query is left out: it can only see
itself, so its statistics say nothing about the head. Everything comes from the kernels (no N×N).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from interp.hooks import Pass, alone
from interp.kernels import call_stats
from interp.models import Model
from interp.params import PROMPTS, Params, param
from interp.progress import Progress

from .base import Analysis, Options, head_rows
from .inputs import TEXTS, chosen_prompts, read_prompts

DEFAULT_MAX_TOKENS = 512


@dataclass(frozen=True)
class SummaryParams(Params):
    analysis = "summary"
    prompts: str | None = param(None, PROMPTS)


class Summary(Analysis):
    name = "summary"
    description = "per-head mean entropy, max-probability, attention distance and first-token mass over texts"
    kinds = ("llm", "encoder", "lvlm")
    scores = {
        "entropy": "mean attention entropy (nats): high = spread out, low = focused",
        "max_prob": "mean probability of the most-attended key",
        "distance": "mean attention distance |query − key| in tokens: high = global, low = local",
        "first_token_mass": "mean attention mass on the first token (sink-heavy heads)",
    }
    Params = SummaryParams
    describe = ("n_tokens",)

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        if options.max_tokens is not None and not 2 <= options.max_tokens <= (model.max_tokens or options.max_tokens):
            raise ValueError(f"--max-tokens {options.max_tokens}: give 2..{model.max_tokens} for {model.name}")
        texts = read_prompts(params["prompts"]) if params["prompts"] else list(TEXTS)
        n = options.samples if options.samples is not None else len(texts)
        if not 1 <= n <= len(texts):
            raise ValueError(f"--samples {n}: there are {len(texts)} prompts (give 1..{len(texts)}, or more "
                             "prompts with --prompts FILE)")
        return [{"prompt": i, "text": texts[i]} for i in chosen_prompts(len(texts), n, options.seed)]

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        max_tokens = options.max_tokens or min(DEFAULT_MAX_TOKENS, model.max_tokens or DEFAULT_MAX_TOKENS)
        return model.prepare(sample["text"], truncation=True, max_length=max_tokens)

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> pd.DataFrame:
        return alone(model, self.sample_pass(model, sample, options, params), options, progress)

    def sample_pass(self, model: Model, sample: dict, options: Options, params: dict) -> Pass:
        """One sample's part of a forward pass (`interp.hooks.Pass`); it finishes as `score_sample`'s rows."""
        inputs = self.sample_inputs(model, sample, options, params)
        n = inputs["input_ids"].shape[-1]
        segments = (torch.arange(n, device=model.device) > 0).long()[None]  # 0: first token, 1: the rest
        rows = []
        request = dict(segments=segments, n_segments=2, stats=("entropy", "max_prob", "mean_distance", "segment_mass"))

        def probe(call):
            st = call_stats(call, **request)
            first = 1 if call.causal else 0
            take = lambda t: t[0, :, first:].float().mean(-1).cpu().numpy()  # noqa: E731  (H,) over queries
            rows.append(head_rows(call.layer, call.heads, call.kv_heads, n_tokens=n, n_queries=n - first,
                                  entropy=take(st.entropy), max_prob=take(st.max_prob),
                                  distance=take(st.mean_distance), first_token_mass=take(st.segment_mass[..., 0])))

        return Pass(inputs, probe, lambda: pd.concat(rows, ignore_index=True), stats=request)

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        scored = samples[samples["n_queries"] > 0]
        if scored.empty:
            raise ValueError("no sample has a query to score: every prompt is a single token")
        weights = scored["n_queries"]
        cols = list(self.scores)
        weighted = scored[cols].mul(weights, axis=0)
        weighted[["layer", "head", "kv_head"]] = scored[["layer", "head", "kv_head"]]
        weighted["n_queries"] = weights
        sums = weighted.groupby(["layer", "head", "kv_head"], as_index=False).sum()
        sums[cols] = sums[cols].div(sums["n_queries"], axis=0)
        return sums.drop(columns="n_queries").sort_values(["layer", "head"], ignore_index=True)
