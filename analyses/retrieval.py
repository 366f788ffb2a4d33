"""`retrieval`: retrieval heads (Wu et al. 2024), scored on needle-in-a-haystack samples, with the causal test.

Per sample: greedy decoding with a KV cache, up to `max_new_tokens` or a newline (or end of sequence). At each
step, each head's argmax key for the query that produces the next token (the kernels' `argmax` on that single
query row against every cached key: no eager attention, no N×N) is tested: if it lies in the needle's answer
span and the prompt token there equals the token just generated, the head's score grows by 1/|span| (the
reference code's rule; `score_rule="paper"` counts distinct span positions instead, the paper's
|copied ∩ needle| / |needle|). A sample counts when the response's ROUGE-1 recall against the answer is above
0.5; a head's score is its mean over counted samples; retrieval heads score above `threshold` (0.1).

The causal test knocks out the top-k retrieval heads (uniform attention, or zero-ablation) and, as a control,
k random heads outside the top min(100, 25 %) in each of `mask_draws` draws (the report gives their spread), and
measures NIAH accuracy again on the same samples. As in the reference code (`needle_in_haystack_with_mask.py`), the
prompt minus its last token runs unmasked, and every step from the prompt's last token on is masked, so the first
answer token already comes from a masked step.

`paper_scores` follows the reference code literally (eager attention, `output_attentions` at every decode
step, a Python loop over heads); tests check that the fast path gives identical scores.
"""

from __future__ import annotations

import inspect
import math
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from interp.app.figures import TEMPLATE, text_table
from interp.compare import head_label
from interp.fanout import fan_out
from interp.hooks import mask_heads
from interp.kernels import call_stats
from interp.models import Model
from interp.params import MAX_NEW_TOKENS, Params, param
from interp.progress import Progress

from .base import Analysis, Options, Role, head_rows
from .inputs import ends_line, eos_ids, greedy
from .niah import NEEDLES, Needle, build_prompt, file_sentences, filler_sentences, locate_answer, read_needles, rouge1_recall

ACCEPT_RECALL = 0.5
DEFAULT_MAX_TOKENS = 2048
SCORE_RULES = ("code", "paper")


@dataclass(frozen=True)
class RetrievalParams(Params):
    analysis = "retrieval"
    lengths: list[int] | None = param(None, "context lengths in tokens, e.g. 1000,2000,4000 (default: max_tokens / 4, "
                                      "/ 2 and max_tokens)", metavar="N,N", low=1)
    depths: list[float] = param((0, 25, 50, 75, 100), "needle depths, percent of the haystack", metavar="P,P", low=0,
                                high=100)
    needles: str | None = param(None, "JSONL file of {\"needle\", \"question\", \"answer\"} (default: the 3 built-in)",
                                metavar="FILE", path=True)
    n_needles: int | None = param(None, "use the first N needles (default all)", metavar="N", low=1)
    haystack: str | None = param(None, "text file for the haystack (default: generated filler, seeded)",
                                 metavar="FILE", path=True)
    template: str | None = param(None, "prompt with {context} and {question} (default: the chat template, else a "
                                 "base prompt)", metavar="TEXT")
    max_new_tokens: int = param(50, MAX_NEW_TOKENS)
    threshold: float = param(0.1, "a retrieval head scores above X", metavar="X")
    score_rule: str = param("code", "code (+1/|span| per copying step, the reference code) or paper (distinct span "
                            "positions copied)", metavar="RULE", choices=SCORE_RULES)
    mask_k: list[int] | None = param(None, "head counts for the masking test (default 5 % of the scored heads; 0 "
                                     "skips it)", metavar="K,K", low=0)
    mask_draws: int = param(3, "random draws of k heads for the masking test's control (the report gives their "
                            "spread)", metavar="N", low=1, before=1)
    mask_mode: str = param("uniform", "uniform (the paper's masking) or zero (zero-ablation)", metavar="MODE",
                           choices=("uniform", "zero"))
    mask_prefill: bool = param(False, "mask the heads in the prompt's forward too (default: from the prompt's last "
                               "token on, as the reference code)", before=True)  # runs from before the choice masked it
    mask_last_token: bool = param(True, "without --mask-prefill, mask the step of the prompt's last token too (the "
                                  "reference code: its prefill stops one token short, so the first answer token comes "
                                  "from a masked step); false: the answer steps only", before=False)  # earlier runs


class Retrieval(Analysis):
    name = "retrieval"
    description = "retrieval heads (Wu et al. 2024) on needle-in-a-haystack samples, with the masking test"
    kinds = ("llm", "lvlm")
    scores = {"retrieval_score": "mean copy-paste score over accepted NIAH samples (retrieval head: > threshold)"}
    Params = RetrievalParams
    sample_columns = {"retrieval_score": "score"}
    roles = (Role("retrieval", "retrieval_score", threshold=0.1, param="threshold",
                  description="retrieval head: retrieval_score > threshold (0.1, Wu et al.; the run's value)"),)
    describe = ("length", "depth", "accepted", "rouge1_recall", "n_tokens", "response")

    def check(self, model: Model) -> None:
        super().check(model)
        if model.tokenizer is None:
            raise ValueError(f"{model.name} has no tokenizer: retrieval builds text prompts")

    def plan(self, model: Model, options: Options, params: dict) -> list[dict]:
        needles = read_needles(params["needles"]) if params["needles"] else list(NEEDLES)
        needles = needles[:params["n_needles"]] if params["n_needles"] else needles
        limit = model.max_tokens
        top = options.max_tokens or min(DEFAULT_MAX_TOKENS, limit or DEFAULT_MAX_TOKENS)
        lengths = params["lengths"] or sorted({top // 4, top // 2, top})
        for n in lengths:
            if limit is not None and n + params["max_new_tokens"] > limit:
                raise ValueError(f"a {n}-token context plus {params['max_new_tokens']} new tokens is longer than "
                                 f"{model.name}'s context of {limit} tokens")
        grid = [{"length": int(n), "depth": float(d), "needle_id": i, **vars(nd)}
                for n in lengths for d in params["depths"] for i, nd in enumerate(needles)]
        if options.samples is not None:
            if options.samples > len(grid):
                raise ValueError(f"--samples {options.samples}: the grid has {len(grid)} samples "
                                 f"({len(lengths)} lengths × {len(params['depths'])} depths × {len(needles)} needles)")
            keep = sorted(random.Random(options.seed).sample(range(len(grid)), options.samples))
            grid = [grid[i] for i in keep]
        return grid

    def sample_inputs(self, model: Model, sample: dict, options: Options, params: dict) -> dict:
        return niah_inputs(model, sample, params, options.seed)[0]

    def score_sample(self, model: Model, sample: dict, options: Options, params: dict,
                     progress: Progress) -> pd.DataFrame:
        inputs, span = niah_inputs(model, sample, params, options.seed)
        steps: dict[int, dict[int, torch.Tensor]] = {}

        def probe(call):
            st = call_stats(call, last_query=True, stats=("argmax",))
            steps.setdefault(call.step, {})[call.layer] = st.argmax[0, :, 0].cpu()
        gen = greedy(model, inputs, params["max_new_tokens"], probe, backend=options.backend,
                     layers=options.layers, heads=options.heads)
        layers = sorted(steps[0])
        argmax = torch.stack([torch.stack([steps[t][i] for i in layers]) for t in range(len(gen))])  # (T, L, H)
        prompt = inputs["input_ids"][0].cpu()
        score, copies = copy_scores(argmax, gen, prompt, span, params["score_rule"])
        response = model.tokenizer.decode(gen, skip_special_tokens=True).rstrip()  # the newline that ended it
        recall = rouge1_recall(sample["answer"], response)
        n_heads, n_kv = model.head_counts()
        heads = torch.tensor(sorted(set(options.heads))) if options.heads is not None else torch.arange(n_heads)  # as captured
        kv = heads // (n_heads // n_kv)
        frames = [head_rows(layer, heads, kv, score=score[i].numpy(), copies=copies[i].numpy())
                  for i, layer in enumerate(layers)]
        out = pd.concat(frames, ignore_index=True)
        info = {"length": sample["length"], "depth": sample["depth"], "needle": sample["needle_id"],
                "n_tokens": prompt.numel(), "span_start": span[0], "span_end": span[1], "response": response,
                "rouge1_recall": recall, "accepted": recall > ACCEPT_RECALL}
        for k, v in reversed(info.items()):
            out.insert(0, k, v)
        return out

    def aggregate(self, samples: pd.DataFrame, params: dict) -> pd.DataFrame:
        keys = ["layer", "head", "kv_head"]
        accepted = samples[samples["accepted"]]
        mean = accepted.groupby(keys, as_index=False)["score"].mean() if len(accepted) else None
        heads = samples[keys].drop_duplicates().sort_values(keys, ignore_index=True)
        if mean is None:
            heads["retrieval_score"] = np.nan
            return heads
        return heads.merge(mean.rename(columns={"score": "retrieval_score"}), on=keys, how="left")

    def finalize(self, model: Model, plan: list[dict], samples: pd.DataFrame, heads: pd.DataFrame, options: Options,
                 params: dict, progress: Progress, extras: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
        """The masking test: NIAH accuracy with the top-k heads knocked out against k random lower-ranked heads."""
        n = len(heads)
        ks = [k for k in params["mask_k"] if k > 0] if params["mask_k"] is not None else [max(1, math.ceil(0.05 * n))]
        if not ks or heads["retrieval_score"].isna().all():
            return {}
        ranked = heads.sort_values("retrieval_score", ascending=False, kind="stable", na_position="last")
        pairs = list(zip(ranked["layer"].astype(int), ranked["head"].astype(int)))
        excluded = min(100, n // 4)
        base = samples.drop_duplicates("sample")
        prefill = params["mask_prefill"]
        mode = params["mask_mode"] + (" (prefill too)" if prefill else " (answer steps only)"
                                      if not params["mask_last_token"] else "")
        rows = [{"condition": "none", "k": 0, "draw": 0, "mode": mode, "niah_score": 100 * base["rouge1_recall"].mean(),
                 "accuracy": base["accepted"].mean(), "heads": ""}]
        rng = random.Random(options.seed)
        tests = []
        for k in ks:
            if k > n - excluded:
                raise ValueError(f"mask_k {k}: only {n - excluded} heads lie outside the top {excluded} for the random control")
            tests += [("top", k, 0, pairs[:k])]
            tests += [("random", k, d, rng.sample(pairs[excluded:], k)) for d in range(int(params["mask_draws"]))]
        entries = [plan[i] for i in base["sample"]]
        jobs = [(entry, chosen, params, options.seed, prefill) for *_, chosen in tests for entry in entries]
        recall = fan_out(masked_recall, model, jobs, progress, "masking")  # independent: spread over a cluster's workers
        for t, (condition, k, draw, chosen) in enumerate(tests):
            recalls = np.array(recall[t * len(entries):(t + 1) * len(entries)])
            rows.append({"condition": condition, "k": k, "draw": draw, "mode": mode, "niah_score": 100 * recalls.mean(),
                         "accuracy": float((recalls > ACCEPT_RECALL).mean()),
                         "heads": ",".join(head_label(layer, head) for layer, head in chosen)})
        return {"masking": pd.DataFrame(rows)}

    def report(self, result) -> list[str]:
        heads, samples, p = result.heads, result.samples, self.stored_params(result.meta)
        per = samples.drop_duplicates("sample")
        lines = [f"{int(per['accepted'].sum())} of {len(per)} samples accepted (ROUGE-1 recall > {ACCEPT_RECALL}); "
                 f"NIAH score {100 * per['rouge1_recall'].mean():.1f}"]
        scored = heads["retrieval_score"].dropna()
        if len(scored):
            n_ret = int((scored > p["threshold"]).sum())
            lines.append(f"retrieval heads (score > {p['threshold']}): {n_ret} of {len(heads)} "
                         f"({100 * n_ret / len(heads):.1f} %); {100 * (scored == 0).mean():.1f} % of heads score 0")
        for length, group in samples.groupby("length"):  # the same, per context length
            ok = group[group["accepted"]]
            n_ok = ok["sample"].nunique()
            share = ""
            if n_ok:
                per_head = ok.groupby(["layer", "head"])["score"].mean()
                best = per_head.sort_values(ascending=False).head(3)
                share = (f"; heads > {p['threshold']}: {100 * (per_head > p['threshold']).mean():.1f} %; top "
                         + ", ".join(f"{layer}-{head} ({v:.2f})" for (layer, head), v in best.items()))
            lines.append(f"  {length} tokens: {n_ok}/{group['sample'].nunique()} accepted{share}")
        masking = result.tables.get("masking")
        if masking is not None:
            lines.append("masking test (" + str(masking["mode"].iloc[0]) + ", NIAH score): " + " · ".join(
                f"{r.condition}{'' if r.condition == 'none' else f'-{r.k}'} {r.mean:.1f}"
                + (f" ± {r.std:.1f} over {r.draws} draws ({r.min:.1f}–{r.max:.1f})" if r.draws > 1 else "")
                for r in masking_spread(masking).itertuples()))
        return lines

    def view(self, result) -> list:
        """NIAH accuracy and ROUGE-1 recall by depth × length, each sample's question, expected answer and response,
        and the masking test."""
        out = [retrieval_grid(result.samples), retrieval_grid(result.samples, "rouge1_recall")]
        per = result.samples.drop_duplicates("sample")
        plan = result.meta["plan"]
        out.append(text_table(pd.DataFrame({
            "sample": per["sample"], "length": per["length"], "depth": per["depth"],
            "question": [plan[int(i)]["question"] for i in per["sample"]],
            "expected": [plan[int(i)]["answer"] for i in per["sample"]], "response": per["response"],
            "recall": per["rouge1_recall"], "accepted": per["accepted"]}), "the samples: question, expected answer, "
                                                                             "response"))
        if "masking" in result.tables:
            out.append(masking_bars(result.tables["masking"]))
        return out


def masked_recall(model: Model, job: tuple) -> float:
    """One sample of the masking test: ROUGE-1 recall of the answer generated with the chosen heads knocked out.
    job: (planned sample, [(layer, head)], params, seed, mask the prefill too)."""
    entry, chosen, params, seed, prefill = job
    inputs, _ = niah_inputs(model, entry, params, seed)
    gen = masked_answer(model, inputs, chosen, params["mask_mode"], params["max_new_tokens"],
                        "prompt" if prefill else "last-token" if params["mask_last_token"] else "answer")
    return rouge1_recall(entry["answer"], model.tokenizer.decode(gen, skip_special_tokens=True))


MASK_FROM = ("prompt", "last-token", "answer")


def masked_answer(model: Model, inputs: dict, chosen: list[tuple[int, int]], mode: str, max_new_tokens: int,
                  start: str = "last-token") -> torch.Tensor:
    """The greedy answer (T,) with the chosen (layer, head)s knocked out from `start` on: "prompt" (the whole
    prompt's forward too), "last-token" (the reference code's timing: the prompt minus its last token runs unmasked,
    then each step from the prompt's last token, which produces the first answer token, is masked) or "answer"
    (the whole prompt unmasked, only the steps after the first answer token masked)."""
    if start not in MASK_FROM:
        raise ValueError(f"unknown masking start {start!r}; choose from {', '.join(MASK_FROM)}")
    if start == "last-token":
        inputs = _cached_prompt(model, inputs)
    with mask_heads(model, chosen, mode=mode, decode_only=start != "prompt"):
        return greedy(model, inputs, max_new_tokens)


def _cached_prompt(model: Model, inputs: dict) -> dict:
    """`inputs` with the KV cache of the prompt minus its last token, computed unmasked: generation then runs the
    prompt's last token as a decode step (one query against the cached keys)."""
    short = {name: inputs[name][:, :-1] for name in ("input_ids", "attention_mask") if name in inputs}
    with torch.no_grad():
        cache = model.hf(**short, use_cache=True).past_key_values
    name = "cache" if "cache" in inspect.signature(model.hf.forward).parameters else "past_key_values"  # 5.24 / 5.23
    return {**inputs, name: cache}


def niah_inputs(model: Model, sample: dict, params: dict, seed: int) -> tuple[dict, tuple[int, int]]:
    """(model inputs, answer span (start, end) in the prompt's tokens) of one NIAH sample."""
    needle = Needle(sample["needle"], sample["question"], sample["answer"])
    sentences = file_sentences(params["haystack"]) if params["haystack"] else filler_sentences(seed)
    prompt = build_prompt(model.tokenizer, needle, sample["length"], sample["depth"], sentences, params["template"])
    add_special = params["template"] is not None or not getattr(model.tokenizer, "chat_template", None)
    inputs = model.prepare(prompt, add_special_tokens=add_special)
    return inputs, locate_answer(model.tokenizer, inputs["input_ids"][0].cpu(), needle.answer)


def copy_scores(argmax: torch.Tensor, generated: torch.Tensor, prompt: torch.Tensor, span: tuple[int, int],
                rule: str = "code") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head copy-paste scores of one sample from each step's argmax keys.

    argmax: (T, L, H) key index of each head's attention maximum at step t (the step producing generated[t]).
    Returns (score, copies), each (L, H): copies counts the steps where the head's argmax lies in the span and
    holds the token just generated; score = copies / |span| ("code"), or the distinct span positions so
    copied / |span| ("paper")."""
    start, end = span
    inside = (argmax >= start) & (argmax < end)
    token_there = prompt[argmax.clamp(0, prompt.numel() - 1)]
    hit = inside & (token_there == generated[:, None, None])
    copies = hit.sum(0)
    if rule == "code":
        return copies.double() / (end - start), copies
    positions = torch.where(hit, argmax, -1)
    distinct = torch.tensor([[len(set(positions[:, i, h].tolist()) - {-1}) for h in range(argmax.shape[2])]
                             for i in range(argmax.shape[1])])
    return distinct.double() / (end - start), copies


def paper_scores(eager: Model, inputs: dict, span: tuple[int, int], max_new_tokens: int = 50
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's procedure, literally: prefill all but the last prompt token, then decode one token
    at a time with `output_attentions=True`, and for each layer and head take the top-1 key of the current
    query's attention row. `eager` must run eager attention. Returns (scores (L, H), generated ids (T,));
    decoding stops after a newline or end of sequence, as in `greedy`."""
    ids = inputs["input_ids"]
    prompt = ids[0]
    start, end = span
    eos = eos_ids(eager)
    n_layers, (n_heads, _) = eager.n_layers(), eager.head_counts()
    score = torch.zeros(n_layers, n_heads, dtype=torch.float64)
    out = []
    with torch.no_grad():
        past = eager.hf(input_ids=ids[:, :-1], use_cache=True).past_key_values
        inp = ids[:, -1]
        for _ in range(max_new_tokens):
            step = eager.hf(input_ids=inp.view(1, 1), past_key_values=past, use_cache=True, output_attentions=True)
            past = step.past_key_values
            inp = step.logits[0, -1].argmax()
            out.append(int(inp))
            for layer in range(n_layers):
                for head in range(n_heads):
                    _, idx = step.attentions[layer][0][head][-1].topk(1)
                    for i in idx:
                        if start <= i < end and int(inp) == int(prompt[i]):
                            score[layer, head] += 1 / (end - start)
                            break
            if ends_line(eager.tokenizer, int(inp)) or int(inp) in eos:
                break
    return score, torch.tensor(out)


# ---- figures of this analysis's view (also for notebooks)


def retrieval_grid(samples: pd.DataFrame, value: str = "accepted") -> go.Figure:
    """NIAH accuracy (or mean `value`) per needle depth × context length, one value per sample."""
    per = samples.drop_duplicates("sample")
    grid = per.groupby(["depth", "length"])[value].mean().unstack("length").sort_index()
    z = grid.to_numpy(float) * (100 if value == "accepted" else 1)
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in grid.columns], y=[f"{d:g}%" for d in grid.index],
                               colorscale="RdYlGn", zmin=0, zmax=100 if value == "accepted" else None,
                               text=np.round(z, 1), texttemplate="%{text}",
                               colorbar={"title": "% accepted" if value == "accepted" else value},
                               hovertemplate="depth %{y}, length %{x}<br>%{z:.1f}<extra></extra>"))
    fig.update_layout(title="needle retrieval by depth × length" + ("" if value == "accepted" else f" ({value})"),
                      xaxis_title="context length (tokens)", yaxis_title="needle depth", template=TEMPLATE,
                      xaxis={"type": "category"}, yaxis={"type": "category", "autorange": "reversed"})
    return fig


def masking_spread(masking: pd.DataFrame) -> pd.DataFrame:
    """The masking table per condition and k: the NIAH score's mean, standard deviation (0 for one draw), min and
    max over the random draws (one row per draw in the table; runs written before draws: one)."""
    draws = masking.assign(draw=masking["draw"] if "draw" in masking else 0)
    spread = draws.groupby(["condition", "k"], sort=False)["niah_score"].agg(["mean", "std", "min", "max", "count"])
    return spread.rename(columns={"count": "draws"}).fillna({"std": 0.0}).reset_index()


def masking_bars(masking: pd.DataFrame) -> go.Figure:
    """The masking test: NIAH score with the top-k retrieval heads knocked out against k random heads (the random
    control's mean over its draws, with its min–max as an error bar)."""
    fig = go.Figure()
    for condition, part in masking_spread(masking).groupby("condition", sort=False):
        error = {"type": "data", "symmetric": False, "array": part["max"] - part["mean"],
                 "arrayminus": part["mean"] - part["min"], "visible": bool((part["draws"] > 1).any())}
        fig.add_trace(go.Bar(x=[str(k) for k in part["k"]], y=part["mean"], name=str(condition), error_y=error,
                             customdata=part[["draws", "min", "max"]].to_numpy(),
                             hovertemplate="k %{x}: %{y:.1f} (%{customdata[0]} draws, %{customdata[1]:.1f}–"
                                           "%{customdata[2]:.1f})<extra></extra>"))
    mode = masking["mode"].iloc[0] if "mode" in masking else ""
    fig.update_layout(title=f"masking test ({mode})", xaxis_title="heads masked (k)", yaxis_title="NIAH score",
                      barmode="group", template=TEMPLATE)
    return fig
