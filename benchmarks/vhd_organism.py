"""VHD and VHR on organism-llava, whose answers need the image for image questions and not for text-only ones.

1. VHD per head: at the prompt's last position (the step that produces the one-word answer), each head's output
   with the image against without it (image tokens dropped), averaged over the image questions of a held-out set.
2. Ablation: the top-k VHD heads zero-ablated, against k random heads (several draws): accuracy on image
   questions and on text-only questions.
3. VHR (alpha, every layer): accuracy on image questions, and how much the answer depends on the image — the mean
   total-variation distance between the answer distributions with the real image and with a blank image.

    python benchmarks/vhd_organism.py [--questions 300] [--k 4] [--draws 5] [--alpha 2]
"""

from __future__ import annotations

import argparse
import json
import random

import torch

import interp
from interp.hooks import mask_heads
from interp.organisms import llava as org
from interp.analyses.vhd_organism import accuracy, vhd_per_head, vhr_effect


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=300)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=2.0)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = interp.load_model("organism-llava")
    items = org.test_set(args.questions)
    image_q = [q for q in items if q["scene"] is not None]
    text_q = [q for q in items if q["scene"] is None]
    vhd = vhd_per_head(model, image_q)
    n_layers, n_heads = vhd.shape
    ranked = sorted(((float(vhd[lay, h]), lay, h) for lay in range(n_layers) for h in range(n_heads)), reverse=True)
    print("VHD per head (layer × head):\n" + "\n".join("  " + " ".join(f"{float(v):6.2f}" for v in row) for row in vhd))
    top = [(lay, h) for _, lay, h in ranked[:args.k]]
    rng = random.Random(0)
    everyone = [(lay, h) for lay in range(n_layers) for h in range(n_heads)]
    rows = [("none", [])] + [(f"top-{args.k} VHD", top)] + [
        (f"random-{i}", rng.sample([p for p in everyone if p not in top], args.k)) for i in range(args.draws)]
    results = []
    for name, heads in rows:
        with mask_heads(model, heads, mode="zero"):
            results.append({"ablated": name, "heads": heads, "image_accuracy": accuracy(model, image_q),
                            "text_accuracy": accuracy(model, text_q)})
    for r in results:
        print(f"{r['ablated']:>12}  image {100 * r['image_accuracy']:5.1f} %  text {100 * r['text_accuracy']:5.1f} %  "
              f"{','.join(f'{a}-{b}' for a, b in r['heads'])}")
    vhr = vhr_effect(model, image_q, args.alpha)
    for name, v in vhr.items():
        print(f"{name:>5}: image accuracy {100 * v['accuracy']:.1f} %, TV(real, blank image) {v['tv_real_vs_blank']:.3f}")
    print(json.dumps({"vhd": vhd.tolist(), "ablation": results, "vhr": vhr, "questions": len(items)}))


if __name__ == "__main__":
    main()
