"""`lookback`: heads whose most-attended key lies a fixed number of tokens back (offset 1: previous-token heads).

For every head: the percentage of queries whose argmax key is the token `offset` positions before them, over
the built-in natural texts (`--samples N`: a seeded random choice of them, the same as summary's; queries with
fewer than `offset` tokens before them are left out). The argmax comes from the
kernels (nothing N×N). This module is the worked example of docs/adding-an-analysis.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from interp.hooks import Pass, alone
from interp.kernels import call_stats
from interp.models import Model
from interp.params import Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .inputs import TEXTS, chosen_prompts

ARGMAX = dict(stats=("argmax",))  # what every layer's probe asks of the kernels


@dataclass(frozen=True)
class LookbackParams(Params):
    analysis = "lookback"
    offset: int = param(1, "how far back the key lies (1: the previous token, 0: the query itself)", metavar="N",
                        low=0)


class Lookback(Analysis):
    name = "lookback"
    description = "heads whose most-attended key lies `offset` tokens back (previous-token heads by default)"
    kinds = ("llm", "encoder", "lvlm")
    scores = {"lookback_rate": "% of queries whose most-attended key is `offset` tokens back"}
    Params = LookbackParams
    describe = ("n_tokens",)
    roles = (Role("lookback", "lookback_rate", threshold=50.0,
                  description="lookback head: the key `offset` tokens back is the most-attended key of more than 50 % "
                              "of the queries (offset 1, the default: a previous-token head)"),)

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        n = options.samples or 4
        if not 1 <= n <= len(TEXTS):
            raise ValueError(f"--samples {n}: give 1..{len(TEXTS)}")
        plan = [{"prompt": i, "text": TEXTS[i]} for i in chosen_prompts(len(TEXTS), n, options.seed)]
        for sample in plan:  # every sample needs a query with `offset` tokens before it
            tokens = self.sample_inputs(model, sample, options, params)["input_ids"].shape[-1]
            if tokens <= params["offset"]:
                raise ValueError(f"--offset {params['offset']}: a sample has {tokens} tokens; give a smaller offset "
                                 "or a larger --max-tokens")
        return plan

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        return model.prepare(sample["text"], truncation=True, max_length=options.max_tokens or 128)

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> pd.DataFrame:
        return alone(model, self.sample_pass(model, sample, options, params), options, progress)

    def sample_pass(self, model: Model, sample: dict, options: Options, params: dict) -> Pass:
        """One sample's part of a forward pass (`interp.hooks.Pass`); it finishes as `score_sample`'s rows."""
        inputs = self.sample_inputs(model, sample, options, params)
        n, offset = inputs["input_ids"].shape[-1], params["offset"]
        rows = []

        def probe(call):
            argmax = call_stats(call, **ARGMAX).argmax[0, :, offset:]  # (H, n - offset) key of each query
            hits = argmax == torch.arange(n - offset, device=argmax.device)  # the key `offset` tokens back
            rows.append(head_rows(call.layer, call.heads, call.kv_heads, n_tokens=n, n_queries=n - offset,
                                  lookback_rate=100 * hits.float().mean(-1).cpu().numpy()))

        return Pass(inputs, probe, lambda: pd.concat(rows, ignore_index=True), stats=ARGMAX)

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        """Each head's rate over all queries of all samples (a sample weighs by its queries)."""
        hits = samples.assign(hits=samples["lookback_rate"] * samples["n_queries"])
        sums = hits.groupby(["layer", "head", "kv_head"], as_index=False)[["hits", "n_queries"]].sum()
        return sums.assign(lookback_rate=sums["hits"] / sums["n_queries"].clip(lower=1))[
            ["layer", "head", "kv_head", "lookback_rate"]]
