"""VHD and VHR measured on organism-llava's own questions, whose answers are known: per-head VHD at the answer
position, greedy accuracy, and VHR's effect on accuracy and on how much the answers depend on the image
(`benchmarks/vhd_organism.py`, tests/test_vhd.py)."""

from __future__ import annotations

import torch

from interp.hooks import mask_heads
from interp.organisms.llava import VOCAB, encode, first_answer_ids

from .base import Options
from .vhd import head_outputs, vhr_heads


def vhd_per_head(model, items) -> torch.Tensor:
    """(L, H) mean VHD (an `interp.Model` of this organism) at the prompt's last position over image questions."""
    opts = Options()
    total = 0
    for q in items:
        z_img = head_outputs(model, dict(encode(model.processor, [q], False)), torch.tensor([0]), opts)
        z_no = head_outputs(model, dict(encode(model.processor, [q], False, no_image=True)), torch.tensor([0]), opts)
        total = total + (z_img - z_no)[:, :, 0].norm(dim=-1)
    return total / len(items)


def accuracy(model, items) -> float:
    """Greedy first-answer accuracy of an `interp.Model` of this organism on items."""
    gold = torch.tensor([VOCAB[q["answer"]] for q in items])
    return float((first_answer_ids(model.hf, model.processor, items) == gold).float().mean())


def answer_probs(model, q, blank=False) -> torch.Tensor:
    """(V,) distribution of the first answer token for one item (with a blank image when `blank`)."""
    enc = encode(model.processor, [q], False, blank=blank)
    with torch.no_grad():
        return model.hf(**enc).logits[0, -1].softmax(-1)


def vhr_effect(model, items, alpha: float) -> dict:
    """Accuracy and image dependence (mean TV distance real vs blank image) with and without VHR."""
    out = {"plain": {"correct": 0, "tv": 0.0}, "vhr": {"correct": 0, "tv": 0.0}}
    layers = list(range(model.n_layers()))
    for q in items:
        gold = VOCAB[q["answer"]]
        with_image = dict(encode(model.processor, [q], False))
        without = dict(encode(model.processor, [q], False, no_image=True))
        chosen = vhr_heads(model, with_image, without, layers, alpha)
        pairs = [(lay, h) for lay, hs in chosen.items() for h in hs]
        for name, heads in (("plain", []), ("vhr", pairs)):
            with mask_heads(model, heads, mode="scale", factor=alpha):
                real, blank = answer_probs(model, q), answer_probs(model, q, blank=True)
            out[name]["correct"] += int(real.argmax()) == gold
            out[name]["tv"] += 0.5 * float((real - blank).abs().sum())
    return {name: {"accuracy": v["correct"] / len(items), "tv_real_vs_blank": v["tv"] / len(items)}
            for name, v in out.items()}
