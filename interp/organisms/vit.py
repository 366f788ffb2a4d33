"""The ViT model organism: a small `ViTForImageClassification` trained here on a synthetic counting task.

Task (see `TASK`): a 4 × 4 grid scene of 4–8 coloured shapes, rendered at 32 × 32 px, so with patch size 8 each
grid cell is exactly one patch. The label is how many items share the colour of the *first* item in reading order
(classes "1".."4"). Solving it needs local information (each patch's colour) and global information (which
occupied patch comes first, and how many other patches match its colour anywhere in the image).

Regenerate the committed weights with `python -m interp.organisms.train_vit` (seeded, CPU, a few minutes).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

from interp.organisms.scenes import random_scene, Scene

GRID = 4
IMAGE_SIZE = 32
PATCH_SIZE = 8
MIN_ITEMS, MAX_ITEMS = 4, 8
CLASSES = (1, 2, 3, 4)
TEST_SEED = 1_000_003
TEST_SIZE = 2000

TASK = (
    f"A {GRID}x{GRID} grid scene of {MIN_ITEMS}-{MAX_ITEMS} shapes (square/circle/triangle) coloured "
    f"red/green/blue/yellow, rendered at {IMAGE_SIZE}x{IMAGE_SIZE} px (one {PATCH_SIZE}x{PATCH_SIZE} patch per cell). "
    "Label: how many items share the colour of the first item in reading order (row, then column), "
    "counting the first item itself; classes 1..4, sampled balanced (scenes whose count is above 4 are redrawn)."
)


def label(scene: Scene) -> int:
    """How many items have the colour of the first item in reading order (1 ≤ label ≤ number of items)."""
    first = scene.items[0].colour
    return sum(item.colour == first for item in scene.items)


def balanced_scene(rng: np.random.Generator, target: int) -> Scene:
    """A random scene whose label is `target` (rejection sampling over `random_scene`)."""
    while True:
        scene = random_scene(rng, GRID, MIN_ITEMS, MAX_ITEMS)
        if label(scene) == target:
            return scene


def dataset(n: int, seed: int) -> tuple[list[Image.Image], torch.Tensor]:
    """n scenes with uniformly drawn labels: (images, each IMAGE_SIZE × IMAGE_SIZE RGB; class ids [n], long).

    Class id = label - 1, so class id k means "k + 1 items share the first item's colour".
    """
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for _ in range(n):
        target = int(rng.choice(CLASSES))
        images.append(balanced_scene(rng, target).render(IMAGE_SIZE))
        ids.append(target - 1)
    return images, torch.tensor(ids, dtype=torch.long)


def make_processor() -> ViTImageProcessorPil:
    """The image processor saved beside the weights: RGB [0, 255] → (x / 255 - 0.5) / 0.5, no real resize."""
    return ViTImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_rescale=True, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def make_config(hidden: int = 64, layers: int = 4, heads: int = 4, intermediate: int = 128) -> transformers.ViTConfig:
    """The organism's ViT config: 16 patches + CLS = 17 tokens of width `hidden`, 4 output classes."""
    return transformers.ViTConfig(
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=len(CLASSES),
        id2label={i: str(c) for i, c in enumerate(CLASSES)},
        label2id={str(c): i for i, c in enumerate(CLASSES)},
    )


@torch.no_grad()
def evaluate(model: transformers.ViTForImageClassification, pixels: torch.Tensor, ids: torch.Tensor,
             batch: int = 500) -> dict:
    """Accuracy and mean cross-entropy of `model` on pixels [n, 3, S, S] with class ids [n]."""
    model.eval()
    logits = torch.cat([model(pixel_values=pixels[i:i + batch]).logits for i in range(0, len(ids), batch)])
    return {
        "accuracy": (logits.argmax(-1) == ids).float().mean().item(),
        "loss": torch.nn.functional.cross_entropy(logits, ids).item(),
    }
