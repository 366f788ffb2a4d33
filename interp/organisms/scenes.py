"""Synthetic scenes for the vision model organisms: coloured shapes on a grid, with their description.

A scene is a G × G grid of cells; some cells hold one shape (square, circle, triangle) of one colour (red, green,
blue, yellow) on a dark background. Everything a task asks about — which shapes, their colours, where they are
and how many — is in the `Scene`, so labels and answers are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("square", "circle", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (230, 210, 40)}
BACKGROUND = (30, 30, 34)


@dataclass(frozen=True)
class Item:
    """One shape: its cell (row, col), kind and colour name."""

    row: int
    col: int
    shape: str
    colour: str


@dataclass(frozen=True)
class Scene:
    """A grid × grid scene of items (at most one per cell), in reading order (row, then column)."""

    grid: int
    items: tuple[Item, ...]

    def render(self, size: int) -> Image.Image:
        """The scene as a size × size RGB image (size a multiple of grid)."""
        if size % self.grid:
            raise ValueError(f"image size {size} is not a multiple of the grid {self.grid}")
        cell = size // self.grid
        img = Image.new("RGB", (size, size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        pad = max(1, cell // 8)
        for it in self.items:
            x0, y0 = it.col * cell + pad, it.row * cell + pad
            x1, y1 = (it.col + 1) * cell - pad - 1, (it.row + 1) * cell - pad - 1
            fill = COLOURS[it.colour]
            if it.shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            elif it.shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return img


def random_scene(rng: np.random.Generator, grid: int = 4, min_items: int = 1, max_items: int = 4,
                 unique_shapes: bool = False) -> Scene:
    """A scene with min_items … max_items items in distinct random cells; unique_shapes: no shape twice."""
    if not 1 <= min_items <= max_items <= grid * grid:
        raise ValueError(f"items {min_items}..{max_items} do not fit a {grid} × {grid} grid")
    if unique_shapes and max_items > len(SHAPES):
        raise ValueError(f"unique shapes allow at most {len(SHAPES)} items")
    n = int(rng.integers(min_items, max_items + 1))
    cells = sorted(rng.choice(grid * grid, size=n, replace=False).tolist())
    shapes = rng.permutation(SHAPES)[:n] if unique_shapes else rng.choice(SHAPES, size=n)
    colours = rng.choice(list(COLOURS), size=n)
    return Scene(grid, tuple(Item(c // grid, c % grid, str(s), str(k)) for c, s, k in zip(cells, shapes, colours)))
