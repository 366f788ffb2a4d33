"""Images for the vision analyses: the user's (a file or a folder), or built-in synthetic scenes.

The built-in scenes are drawn here from a seed: a smooth background (sky-like gradient plus low-frequency
texture) with a few filled shapes of random colours, so that, as in natural photos, most of the image is
background and a few regions are objects.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .inputs import read_user_bytes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
BUILTIN_IMAGES = 16
SIZE = 224


def synthetic_image(seed: int, size: int = SIZE) -> Image.Image:
    """One seeded scene: a gradient-and-texture background with 1–4 shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = top[None, None] * (1 - y[..., None]) + bottom[None, None] * y[..., None]
    waves = sum(np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform())) for _ in range(3))
    base = np.clip(base + 12 * waves[..., None], 0, 255).astype(np.uint8)
    img = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        w = int(rng.integers(size // 8, size // 3))
        x0, y0 = (int(v) for v in rng.integers(0, size - w, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(0, 2))]
        shape([x0, y0, x0 + w, y0 + w], fill=colour)
    return img


def image_files(path: str | Path) -> list[Path]:
    """The image files named by `path` (one file, or a folder's images sorted by name), each checked to decode as an
    image, with clear errors."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    elif not path.exists():
        raise ValueError(f"no image at {path}")
    else:
        files = [path]
    for file in files:
        _decoded(file, lambda img: img.verify())
    return [p.resolve() for p in files]


def load_image(source: str | int) -> Image.Image:
    """An image from a file path (read as `read_user_bytes` reads it), or the built-in synthetic scene with that
    index."""
    if isinstance(source, int):
        return synthetic_image(source)
    return _decoded(source, lambda img: img.convert("RGB"))


def _decoded(source: str | Path, use):
    """use(the image in `source`), with a clear error when it is not an image that PIL decodes."""
    data = read_user_bytes(source, "the image")
    try:
        with Image.open(io.BytesIO(data)) as img:
            return use(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read the image {source}: {e}") from e
