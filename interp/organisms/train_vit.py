"""Training of the ViT model organism (`interp.organisms.vit`): the run, the held-out metrics and its model card.

Run `python -m interp.organisms.train_vit` to regenerate the committed weights."""

from __future__ import annotations

import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import transformers

from interp.organisms.vit import PATCH_SIZE, TASK, TEST_SEED, TEST_SIZE, dataset, evaluate, make_config, make_processor


def train(out_dir: str | Path, seed: int = 0, steps: int = 2000, batch: int = 128, lr: float = 2e-3,
          warmup: int = 200, weight_decay: float = 0.01, threads: int = 1) -> dict:
    """Train the organism from scratch on freshly drawn scenes; save model, processor and MODEL_CARD.md to out_dir.

    Step t uses `dataset(batch, seed * 1_000_000 + t)`; the held-out set is `dataset(TEST_SIZE, TEST_SEED)`.
    LR: linear warmup then cosine decay to 0. Returns the held-out metrics and training facts.
    """
    out_dir = Path(out_dir)
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    processor = make_processor()
    config = make_config()
    model = transformers.ViTForImageClassification(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))

    test_images, test_ids = dataset(TEST_SIZE, TEST_SEED)
    test_pixels = processor(test_images, return_tensors="pt")["pixel_values"]  # [TEST_SIZE, 3, S, S]

    start = time.time()
    for t in range(steps):
        model.train()
        images, ids = dataset(batch, seed * 1_000_000 + t)
        pixels = processor(images, return_tensors="pt")["pixel_values"]  # [batch, 3, S, S]
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (t + 1) % 500 == 0 or t + 1 == steps:
            m = evaluate(model, test_pixels, test_ids)
            print(f"step {t + 1:5d}  train loss {loss.item():.4f}  held-out acc {m['accuracy']:.4f} "
                  f"loss {m['loss']:.4f}  {time.time() - start:.0f}s", flush=True)
    seconds = time.time() - start

    metrics = evaluate(model, test_pixels, test_ids)
    info = {
        **metrics, "seed": seed, "steps": steps, "batch": batch, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "threads": threads, "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, torch threads: {threads}), "
                   f"torch {torch.__version__}",
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    (out_dir / "MODEL_CARD.md").write_text(model_card(config, info))
    return info


def model_card(config: transformers.ViTConfig, info: dict) -> str:
    """MODEL_CARD.md text for a trained organism."""
    return f"""# organism-vit

A tiny `ViTForImageClassification` trained from scratch by `interp/organisms/vit.py` as a model organism for
testing interpretability tools. It is **not** a general image model.

## Task

{TASK}

Class ids 0..3 mean labels "1".."4" (`id2label`). The task needs local information (each patch's colour; one
grid cell = one {PATCH_SIZE}x{PATCH_SIZE} patch) and global information (which occupied patch comes first in reading
order, and how many patches anywhere share its colour). Shapes are irrelevant distractors.

## Architecture

`ViTForImageClassification`: image {config.image_size}x{config.image_size}, patch {config.patch_size}
({(config.image_size // config.patch_size) ** 2} patches + CLS), hidden {config.hidden_size},
{config.num_hidden_layers} layers, {config.num_attention_heads} heads, intermediate {config.intermediate_size},
no dropout, {info['parameters']:,} parameters (fp32 safetensors). Preprocessing (`ViTImageProcessorPil`, saved
beside the weights): RGB / 255, then normalise with mean = std = 0.5.

## Training

From scratch on CPU: seed {info['seed']} (torch and numpy), {info['steps']} AdamW steps of {info['batch']} freshly
generated scenes (step t uses scene seed `seed * 1_000_000 + t`), lr {info['lr']} with {info['warmup']} warmup steps
and cosine decay, weight decay {info['weight_decay']}, cross-entropy. Took {info['seconds']:.0f} s wall clock (data
generation included) on {info['machine']}; other jobs may have shared the machine.

## Evaluation

Held-out set: {TEST_SIZE} scenes from `dataset({TEST_SIZE}, {TEST_SEED})` (seed distinct from training), balanced
over the 4 classes. Accuracy **{info['accuracy']:.4f}**, mean cross-entropy **{info['loss']:.4f}**.

## Use

```python
import transformers
from interp.organisms.vit import dataset
model = transformers.ViTForImageClassification.from_pretrained("interp/data/organism-vit")
processor = ViTImageProcessorPil.from_pretrained("interp/data/organism-vit")
images, ids = dataset(8, seed=1)
logits = model(**processor(images, return_tensors="pt")).logits  # [8, 4]
```

## Regenerate

`python -m interp.organisms.train_vit` (writes this folder; CPU, a few minutes). Results may differ in the last digits on
other machines or thread counts.

## Licence

MIT, the same as the project.

## Intended use

Testing and demonstrating interpretability tools on a model whose task and inputs are fully known. Not for any
real-world image classification.
"""


def main() -> None:
    out_dir = Path(__file__).resolve().parents[1] / "data" / "organism-vit"
    info = train(out_dir)
    print(info)


if __name__ == "__main__":
    main()
