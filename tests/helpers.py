"""Shared test helpers: compare attention recomputed from captured q/k with the model's own eager attention."""

from __future__ import annotations

import torch

from interp.hooks import Recorder, capture
from interp.kernels import call_attention


def eager_attentions(model, inputs: dict, tower: str | None = None) -> tuple:
    """Per-layer attention probabilities (B, H, Nq, Nk) from the model's eager `output_attentions`."""
    with torch.no_grad():
        out = model.hf(**inputs, output_attentions=True)
    if tower == "vision":
        return out.vision_attentions if hasattr(out, "vision_attentions") else out.attentions
    return out.attentions


def captured(model, inputs: dict, **kwargs) -> tuple[Recorder, object]:
    """Run a forward under capture; returns the recorder and the model output."""
    rec = Recorder()
    with torch.no_grad(), capture(model, rec, **kwargs):
        out = model.hf(**inputs)
    return rec, out


def max_prob_error(rec: Recorder, reference: tuple, query_mask: torch.Tensor | None = None, step: int = 0) -> float:
    """Largest |p_captured − p_eager| over layers, heads and (unpadded) queries."""
    worst = 0.0
    calls = [c for c in rec.calls if c.step == step]
    assert calls, "nothing was captured"
    for call in calls:
        p = call_attention(call)
        ref = reference[call.layer][:, call.heads].float()
        assert p.shape == ref.shape, (p.shape, ref.shape)
        diff = (p - ref).abs()
        if query_mask is not None:
            diff = diff * query_mask[:, None, -p.shape[2]:, None].to(diff.dtype)
        worst = max(worst, float(diff.max()))
    return worst


def cut_after(monkeypatch, analysis_cls, n_done: int):
    """Make `analysis_cls.score_sample` raise RuntimeError("power cut") once `n_done` samples are done; returns the
    original method (to put back with monkeypatch.setattr)."""
    original, calls = analysis_cls.score_sample, []

    def cut(self, *args):
        calls.append(1)
        if len(calls) == n_done + 1:
            raise RuntimeError("power cut")
        return original(self, *args)

    monkeypatch.setattr(analysis_cls, "score_sample", cut)
    return original
