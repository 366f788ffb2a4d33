"""Token layout: a named segment for every input position, and the patch grid of every image.

Analyses speak in segments ("bos", "cls", "sep", "register", "image", "needle", ...): a `TokenLayout` holds a
segment id per position (B, N) and, for images, the token position of each patch cell on its grid, so that
a kernel can sum attention per segment and a figure can paint attention over an image.
"""

from __future__ import annotations

import inspect
import math

from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                image_size_to_num_patches, unpad_image)
from transformers.vision_utils import get_vision_window_index

from .families import blocks, image_token
from .models import Model


@dataclass
class ImageGrid:
    """One image's tokens on their grid. positions: (rows, cols) token index of each cell, -1 for a cell whose
    patch has no token (ViT-MAE drops masked patches); batch: the sample.

    name: "image" (or "image_base" / "image_tiles" for the two grids of a LLaVA-NeXT image);
    image: index of the image within its sample; patch: pixels per cell side (None when not known).
    """

    positions: Tensor
    batch: int
    image: int
    name: str = "image"
    patch: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.positions.shape)

    def cells(self) -> Tensor:
        """(rows · cols, 2) float (row, col) of each cell, in the order of `positions.reshape(-1)`."""
        rows, cols = self.shape
        return torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2).float()

    def kept(self) -> tuple[Tensor, Tensor]:
        """The cells that hold a token: (K,) their token positions and (K, 2) float (row, col), row-major."""
        flat = self.positions.reshape(-1)
        on = flat >= 0
        return flat[on], self.cells()[on.cpu()]


@dataclass
class TokenLayout:
    """Segments of an input. segments: (B, N) long ids into `names`; grids: every image grid, all samples."""

    names: list[str]
    segments: Tensor
    grids: list[ImageGrid] = field(default_factory=list)

    def id(self, name: str) -> int:
        if name not in self.names:
            raise KeyError(f"no segment {name!r}; this input has {self.names}")
        return self.names.index(name)

    def mask(self, name: str) -> Tensor:
        """(B, N) bool: positions in segment `name`."""
        return self.segments == self.id(name)

    def spans(self, name: str, batch: int = 0) -> list[tuple[int, int]]:
        """Contiguous [start, end) runs of segment `name` in one sample."""
        m = (self.segments[batch] == self.id(name)).tolist() if name in self.names else []
        runs, start = [], None
        for i, on in enumerate(m + [False]):
            if on and start is None:
                start = i
            elif not on and start is not None:
                runs.append((start, i))
                start = None
        return runs

    def add_span(self, name: str, start: int, end: int, batch: int | None = None) -> int:
        """Mark positions [start, end) of one sample (or all) as segment `name`; returns its id."""
        n = self.segments.shape[1]
        if not 0 <= start < end <= n:
            raise ValueError(f"span [{start}, {end}) is outside the input's {n} positions")
        if name not in self.names:
            self.names.append(name)
        rows = slice(None) if batch is None else slice(batch, batch + 1)
        self.segments[rows, start:end] = self.id(name)
        return self.id(name)

    def add_positions(self, name: str, positions: Tensor, batch: int = 0) -> int:
        """Mark the positions where `positions` ((N,) bool) is True in one sample as segment `name`; returns its id."""
        if positions.shape != self.segments.shape[1:]:
            raise ValueError(f"positions must be ({self.segments.shape[1]},), got {tuple(positions.shape)}")
        if name not in self.names:
            self.names.append(name)
        self.segments[batch, positions.to(self.segments.device)] = self.id(name)
        return self.id(name)

    def add_text_span(self, name: str, text: str, input_ids: Tensor, tokenizer, batch: int = 0) -> int:
        """Mark the tokens of `text` (its first occurrence in sample `batch`) as segment `name`."""
        ids = input_ids[batch].tolist()
        for variant in (text, " " + text, text.strip()):
            needle = tokenizer(variant, add_special_tokens=False)["input_ids"]
            for i in range(len(ids) - len(needle) + 1):
                if needle and ids[i : i + len(needle)] == needle:
                    return self.add_span(name, i, i + len(needle), batch)
        raise ValueError(f"the text {text!r} does not occur as whole tokens in sample {batch}")


def token_layout(model: Model, inputs: dict, tower: str | None = None) -> TokenLayout:
    """The layout of `inputs` (what the tokenizer / processor returned) as seen by one tower of `model`."""
    fam, t = model.family, model.family.tower(tower)
    if t.name == "vision":
        return _vision_tower_layout(model, inputs)
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError(f"{model.name}: the {t.name} tower needs input_ids")
    names, seg = ["text"], torch.zeros_like(ids)
    layout = TokenLayout(names, seg)
    mask = inputs.get("attention_mask")
    tok = model.tokenizer
    specials = {"cls": getattr(tok, "cls_token_id", None), "sep": getattr(tok, "sep_token_id", None)}
    if fam.kind == "encoder":
        for name, tid in specials.items():
            if tid is not None and bool((ids == tid).any()):
                layout.names.append(name)
                seg[ids == tid] = layout.id(name)
    bos = getattr(model.config.get_text_config(), "bos_token_id", None)
    if fam.kind in ("llm", "lvlm") and bos is not None:
        first = _first_real(mask, ids)
        is_bos = ids.gather(1, first[:, None])[:, 0] == bos
        if bool(is_bos.any()):
            layout.names.append("bos")
            seg[is_bos.nonzero()[:, 0], first[is_bos]] = layout.id("bos")
    if fam.kind == "lvlm":
        _add_images(model, inputs, layout)
    if mask is not None and not bool(mask.bool().all()):
        layout.names.append("pad")
        seg[~mask.bool()] = layout.id("pad")
    return layout


def _first_real(mask: Tensor | None, ids: Tensor) -> Tensor:
    """(B,) index of the first non-padding position."""
    if mask is None:
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    return mask.long().argmax(dim=1)


def _image_token_id(config) -> int:
    found = image_token(config)
    if found is None:
        raise ValueError(f"{config.model_type}: the config names no image token id (looked for image_token_id, "
                         "image_token_index), so its image tokens cannot be located")
    return found


def _add_images(model: Model, inputs: dict, layout: TokenLayout) -> None:
    """Mark image tokens of an LVLM's text stream and lay each image out on its grid."""
    ids, cfg = inputs["input_ids"], model.config
    is_image = ids == _image_token_id(cfg)
    if not bool(is_image.any()):
        return
    layout.names.append("image")
    layout.segments[is_image] = layout.id("image")
    if model.family.image_layout == "tokens":  # no grid known for this family: the image tokens as spans
        return
    per_sample = is_image.sum(1).tolist()
    counts = _tokens_per_image(model, inputs, sum(per_sample))
    if sum(n for n, _ in counts) != sum(per_sample):
        raise ValueError(f"{model.name}: the images of these inputs take {[n for n, _ in counts]} tokens, "
                         f"but input_ids hold {sum(per_sample)} image tokens")
    queue = list(counts)
    for b in range(ids.shape[0]):
        positions = is_image[b].nonzero()[:, 0]
        used, image = 0, 0
        while used < per_sample[b]:
            n, shapes = queue.pop(0)
            if used + n > per_sample[b]:
                raise ValueError(f"{model.name}: the {per_sample[b]} image tokens of sample {b} are not whole images")
            chunk = positions[used : used + n]
            used += n
            for name, rows, cols, start, stride in shapes:
                idx = start + torch.arange(rows)[:, None] * stride + torch.arange(cols)[None, :]
                layout.grids.append(ImageGrid(chunk[idx], b, image, name, _patch(model)))
                if stride > cols:  # a newline token closes every row
                    if "image_newline" not in layout.names:
                        layout.names.append("image_newline")
                    layout.segments[b, chunk[start + torch.arange(rows) * stride + cols]] = layout.id("image_newline")
            image += 1


def _patch(model: Model) -> int | None:
    """Pixels per grid cell side: the vision tower's patch, times the cells it pools or shuffles into one token."""
    vc = getattr(model.config, "vision_config", None)
    patch = _side(getattr(vc, "patch_size", None))
    if model.family.image_layout in ("pooled", "tiles") and patch is not None:
        return _side(vc.image_size) // _square_side(model)
    return patch


def _side(size) -> int | None:
    """One side of a size given as an int or a (height, width) pair (square tiles)."""
    return int(size[0]) if isinstance(size, (list, tuple)) else size


def _square_side(model: Model) -> int:
    """Tokens per side of the square one image (Gemma 3's pooled cells) or one tile (InternVL's and Idefics3's
    pixel-shuffled patches) becomes in the text stream."""
    cfg = model.config
    if model.family.image_layout == "pooled":
        return math.isqrt(int(cfg.mm_tokens_per_image))
    vc = cfg.vision_config
    patches = _side(vc.image_size) // _side(vc.patch_size)
    if hasattr(cfg, "downsample_ratio"):  # InternVL
        return int(patches * cfg.downsample_ratio)
    return patches // int(cfg.scale_factor)  # Idefics3 / SmolVLM


def _tokens_per_image(model: Model, inputs: dict, n_tokens: int) -> list[tuple[int, list[tuple[str, int, int, int, int]]]]:
    """Per image: (token count, [(grid name, rows, cols, first token, row stride)]). n_tokens: image tokens in all."""
    cfg = model.config
    if model.family.image_layout == "merged":  # Qwen2-VL: (t, h, w) patches merged m×m
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise ValueError(f"{model.name}: Qwen2-VL inputs need image_grid_thw (use the model's processor)")
        m = cfg.vision_config.spatial_merge_size
        out = []
        for t, h, w in thw.tolist():
            rows, cols = t * h // m, w // m
            out.append((rows * cols, [("image", rows, cols, 0, cols)]))
        return out
    if model.family.image_layout in ("pooled", "tiles"):  # a square per image (Gemma 3) or per tile (InternVL, ...)
        side = _square_side(model)
        return [(side * side, [("image", side, side, 0, side)])] * -(-n_tokens // (side * side))
    vc = cfg.vision_config
    side = vc.image_size // vc.patch_size
    extra = _kept_prefix(model)
    base = side * side + extra
    if cfg.model_type == "llava":  # every image is `base` tokens: count them from input_ids
        n_images = -(-n_tokens // base)  # rounded up: a partial image then fails the caller's count check
        return [(base, [("image", side, side, extra, side)])] * n_images

    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise ValueError(f"{model.name}: LLaVA-NeXT / OneVision inputs need image_sizes (use the model's processor)")
    out = []
    for size in sizes.tolist():
        nph, npw = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, vc.image_size)
        rows, cols = unpad_image(torch.empty(1, nph * side, npw * side), size).shape[1:]
        if cfg.model_type == "llava_onevision":  # "anyres_max_N": a canvas above N base images is resized down
            ratio = math.sqrt(rows * cols / (int(cfg.vision_aspect_ratio.strip("anyres_max_")) * side**2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        shapes = [("image_base", side, side, extra, side), ("image_tiles", rows, cols, base, cols + 1)]
        out.append((base + rows * (cols + 1), shapes))
    return out


_PREFIX_PARAMETERS = {"cls_token": "cls", "class_embedding": "cls", "distillation_token": "distillation"}


def vision_prefix(model: Model) -> list[str]:
    """Names of the tokens a vision tower's embeddings put before its patches, in order: CLS (a `cls_token` or
    `class_embedding` parameter), DeiT's distillation token (`distillation_token`), then the vision config's
    `num_register_tokens` registers. The layout's length check (`_vision_tower_layout`) catches what this misses."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.hf.named_parameters()}
    prefix = [seg for param, seg in _PREFIX_PARAMETERS.items() if param in leaves]
    vc = getattr(model.config, "vision_config", model.config)
    return prefix + ["register"] * int(getattr(vc, "num_register_tokens", 0) or 0)


def _kept_prefix(model: Model) -> int:
    """How many of the vision tower's prefix tokens (CLS) LLaVA keeps before each image's patch features.

    "default" drops the first token, "full" keeps them all; "default" on a tower without CLS drops a patch.
    """
    n = len(vision_prefix(model))
    if getattr(model.config, "vision_feature_select_strategy", "default") == "full":
        return n
    if n == 0:
        raise NotImplementedError(f"{model.name}: the \"default\" feature strategy on a vision tower without CLS "
                                  "drops the first patch, so the image tokens form no grid")
    return n - 1


def _vision_tower_layout(model: Model, inputs: dict) -> TokenLayout:
    """Layout of the sequence a vision encoder sees: prefix tokens (CLS, distillation, registers), then patches.

    Checked against the model: a layout whose length is not the length of the sequence the tower's first block
    receives is an error naming both, never a silent misplacement.
    """
    pixels = inputs.get("pixel_values")
    if pixels is None:
        raise ValueError(f"{model.name}: the vision tower needs pixel_values (an image); none was given")
    cfg = model.config
    vc = getattr(cfg, "vision_config", cfg)
    if model.family.image_layout == "merged":
        return _qwen_vision_layout(inputs, vc)
    if model.family.image_layout in ("tokens", "pooled", "tiles"):
        raise ValueError(f"{model.name} ({cfg.model_type}): the layout of its vision tower is not known to interp; "
                         "its text tower's layout marks the image tokens")
    if "spatial_shapes" in inputs:
        layout = _naflex_layout(model, inputs, vc)
    else:
        layout = _patch_layout(model, inputs, vc)
    n = _tower_length(model, inputs)
    if layout.segments.shape[1] != n:
        counts = {name: int((layout.segments[0] == i).sum()) for i, name in enumerate(layout.names)}
        raise ValueError(f"{model.name} ({cfg.model_type}): interp's layout of the vision tower has "
                         f"{layout.segments.shape[1]} positions ({counts}), but the tower's blocks see {n}: this "
                         "tower puts tokens interp does not know of before, among or after its patches")
    return layout


def _patch_layout(model: Model, inputs: dict, vc) -> TokenLayout:
    """Pixels (..., C, H, W) cut into (H/p) × (W/p) patches in row-major order, after the prefix tokens; where the
    model drops masked patches (ViT-MAE), only the kept ones, in the model's order (`_kept_patches`)."""
    pixels = inputs["pixel_values"]
    prefix = vision_prefix(model)
    batch = pixels.reshape(-1, *pixels.shape[-3:]).shape[0]
    if model.family.kind == "lvlm" and pixels.dim() == 5:  # LLaVA-NeXT: (images, max crops, C, H, W), zero-padded
        batch = _llava_next_crops(model, inputs)          # the tower sees the real crops only
    patch = _side(vc.patch_size)
    rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    kept = _kept_patches(model, inputs, rows * cols, batch)   # (B, K)
    names = ["image"] + list(dict.fromkeys(prefix))
    seg = torch.tensor([names.index(p) for p in prefix] + [0] * kept.shape[1]).expand(batch, -1).clone()
    grids = []
    for b in range(batch):
        positions = torch.full((rows * cols,), -1, dtype=torch.long)
        positions[kept[b]] = len(prefix) + torch.arange(kept.shape[1])
        grids.append(ImageGrid(positions.view(rows, cols), b, 0, "image", patch))
    return TokenLayout(names, seg, grids)


def _masks_patches(model: Model) -> bool:
    """Whether the model drops a random share (`mask_ratio`) of the patches on each forward unless given `noise`."""
    return hasattr(model.config, "mask_ratio") and "noise" in inspect.signature(model.hf.forward).parameters


def _kept_patches(model: Model, inputs: dict, n_patches: int, batch: int) -> Tensor:
    """(B, K) the patch index (row-major) behind each patch token, in token order: all patches, or, for ViT-MAE,
    the (1 - mask_ratio) share of lowest `noise` (B, P), in increasing noise as its `random_masking` keeps them."""
    if not _masks_patches(model):
        return torch.arange(n_patches).expand(batch, -1)
    noise = inputs.get("noise")
    if noise is None:
        raise ValueError(f"{model.name} ({model.config.model_type}) drops a random {model.config.mask_ratio:.0%} of "
                         "the patches on each forward: give inputs a `noise` (B, patches) tensor (it keeps the "
                         "patches of lowest noise), e.g. from interp.layout.fixed_masking, so that the layout and "
                         "the forward keep the same patches")
    keep = int(n_patches * (1 - model.config.mask_ratio))
    return torch.argsort(noise.cpu(), dim=1)[:, :keep]


def fixed_masking(model: Model, inputs: dict) -> dict:
    """`inputs`, with a fixed `noise` (B, patches) added where the model drops random patches on each forward
    (ViT-MAE) and none is given: the same patches of every image (seed 0) in every forward and in the layout."""
    if not _masks_patches(model) or "noise" in inputs:
        return inputs
    pixels = inputs["pixel_values"]
    patch = _side(model.config.patch_size)
    n = (pixels.shape[-2] // patch) * (pixels.shape[-1] // patch)
    noise = torch.rand(n, generator=torch.Generator().manual_seed(0))
    return {**inputs, "noise": noise.expand(pixels.shape[0], -1).to(pixels.device)}


def _naflex_layout(model: Model, inputs: dict, vc) -> TokenLayout:
    """SigLIP2's NaFlex input: patchified pixel_values (B, P, C·p²); image b is the spatial_shapes[b] = (rows, cols)
    grid of its first rows·cols patch tokens, row-major; the rest are padding (pixel_attention_mask 0), on no grid."""
    shapes, (batch, n) = inputs["spatial_shapes"].tolist(), inputs["pixel_values"].shape[:2]
    real = inputs.get("pixel_attention_mask")
    names, seg, grids = ["image"], torch.zeros(batch, n, dtype=torch.long), []
    for b, (rows, cols) in enumerate(shapes):
        if real is not None and not torch.equal(real[b].bool().cpu(), torch.arange(n) < rows * cols):
            raise ValueError(f"{model.name}: pixel_attention_mask of image {b} does not mark its first {rows}·{cols} "
                             f"patches (spatial_shapes) as the real ones; it marks {int(real[b].bool().sum())}")
        if rows * cols < n:
            if "pad" not in names:
                names.append("pad")
            seg[b, rows * cols:] = names.index("pad")
        grids.append(ImageGrid(torch.arange(rows * cols).view(rows, cols), b, 0, "image", _side(vc.patch_size)))
    return TokenLayout(names, seg, grids)


class _Reached(Exception):
    """Raised by `_tower_length`'s hook to stop the forward at the tower's first block."""


def _tower_length(model: Model, inputs: dict) -> int:
    """N: the length of the sequence (B, N, D) the vision tower's first block receives for `inputs` (the model runs
    up to that block and stops)."""
    _, layers = blocks(model.hf, model.family.tower("vision"))
    seen = {}

    def reached(module, args, kwargs):
        seen["n"] = (args[0] if args else kwargs["hidden_states"]).shape[-2]
        raise _Reached

    handle = layers[0].register_forward_pre_hook(reached, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf(**inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if "n" not in seen:
        raise ValueError(f"{model.name}: the forward on these inputs never reached the vision tower's first block")
    return seen["n"]


def _llava_next_crops(model: Model, inputs: dict) -> int:
    """How many crops (base image + anyres tiles) of all images LLaVA-NeXT's vision tower encodes."""

    sizes = inputs.get("image_sizes")
    if sizes is None:
        raise ValueError(f"{model.name}: LLaVA-NeXT inputs need image_sizes (use the model's processor)")
    cfg = model.config
    return sum(image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size) for s in sizes.tolist())


def _qwen_vision_layout(inputs: dict, vc) -> TokenLayout:
    """Qwen2-VL's vision sequence: every image's patches, ordered in m×m merge blocks, one sample.

    Qwen2.5-VL's blocks see those merge blocks permuted into window order (`window_size` in its vision config).
    """
    thw = inputs.get("image_grid_thw")
    if thw is None:
        raise ValueError("Qwen2-VL inputs need image_grid_thw (use the model's processor)")
    m, grids, offset = vc.spatial_merge_size, [], 0
    for image, (t, h, w) in enumerate(thw.tolist()):
        r, c = torch.arange(t * h)[:, None], torch.arange(w)[None, :]
        frame, r_in = r // h, r % h
        index = (((frame * (h // m) + r_in // m) * (w // m) + c // m) * m + r_in % m) * m + c % m
        grids.append(ImageGrid(offset + index, 0, image, "image", vc.patch_size))
        offset += t * h * w
    if getattr(vc, "window_size", None):
        where = _window_position(thw, vc)  # (merge blocks,) position of each merge block in window order
        for g in grids:
            g.positions = where[g.positions // m**2] * m**2 + g.positions % m**2
    return TokenLayout(["image"], torch.zeros(1, offset, dtype=torch.long), grids)


def _window_position(thw: Tensor, vc) -> Tensor:
    """(sum t*h*w/m²,) where Qwen2.5-VL's vision blocks see each merge block (block-major order in, window order out)."""
    window_index, _ = get_vision_window_index(thw, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    return torch.argsort(window_index)
