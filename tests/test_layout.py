"""Token layouts checked against what the models themselves do, not against a re-derivation of the layout's formulas.

Truth comes from the model's own forward pass: identifiable vectors are planted where the model computes image
features (the vision tower's output, whose token order the ViT tests establish from the patch convolution) and
read back where the model hands them to its language model; the Qwen vision towers are read through the rotary
(h, w) angles they give each token; ViT prefixes through the parameters (CLS, distillation, registers) that feed
each position. Everything runs on the tiny random models of `tiny_models`.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import pytest
import torch
import transformers as T
from transformers.image_processing_utils import select_best_resolution
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import interp
from interp import token_layout
from tiny_models import CLIPV, IMG_TOK, LN_PINPOINTS, TXT, llava_next_num_image_tokens, make

PATCH, CLS, NEWLINE = 7.0, -3.0, -5.0  # first coordinate of a planted vector: what it is
VITS = ["vit", "deit", "clip", "siglip", "dinov2", "dinov2_reg"]


# ----------------------------------------------------------------------------- helpers
def _load(name: str):
    hf, inputs = make(name)
    return interp.load_model(hf), inputs


def _code(shape, marker: float, *values) -> torch.Tensor:
    """A vector (..., D) that reads (marker, *values, 0, ...) in its first coordinates."""
    out = torch.zeros(shape)
    out[..., 0] = marker
    for i, v in enumerate(values):
        out[..., i + 1] = v
    return out


@contextmanager
def _hooks(*specs):
    """Register (module, kind, fn) hooks for the duration; kind: "fwd" | "pre" (a pre-hook with kwargs)."""
    with ExitStack() as stack:
        for module, kind, fn in specs:
            h = module.register_forward_hook(fn) if kind == "fwd" else module.register_forward_pre_hook(fn, with_kwargs=True)
            stack.callback(h.remove)
        yield


def _embeds_seen_by_lm(model, inputs: dict, *specs) -> torch.Tensor:
    """(B, N, D) the inputs_embeds the language model receives, after the model has put image features in."""
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = kwargs["inputs_embeds"].detach().clone()

    lm = getattr(model.hf.model, "language_model", None) or model.hf.model.text_model  # Idefics3: text_model
    with _hooks((lm, "pre", grab), *specs), torch.no_grad():
        model.hf(**inputs)
    return seen["x"]


def _ids(images_per_row: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask): each row is text, then per image its tokens and more text."""
    g = torch.Generator().manual_seed(5)
    rows = []
    for counts in images_per_row:
        parts = [torch.randint(3, 120, (2,), generator=g)]
        for n in counts:
            parts += [torch.full((n,), IMG_TOK), torch.randint(3, 120, (2,), generator=g)]
        rows.append(torch.cat(parts))
    n = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), n, dtype=torch.long), torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = r, 1
    return ids, mask


def _image_sets(layout) -> list[set[int]]:
    """Per sample, the positions the layout's grids cover."""
    out = [set() for _ in range(layout.segments.shape[0])]
    for g in layout.grids:
        out[g.batch] |= set(g.positions.flatten().tolist())
    return out


def _positions(mask_row: torch.Tensor) -> set[int]:
    return set(mask_row.nonzero()[:, 0].tolist())


# ----------------------------------------------------------------------------- ViT towers
def _prefix_truth(model, inputs: dict) -> tuple[dict[str, set[int]], torch.Tensor, int]:
    """From the model itself: which positions each prefix parameter feeds, and the patch code at every position.

    The patch convolution's output is replaced by (r+1, c+1) at its spatial cell (r, c) (run A) or zeros (run B):
    the difference of the embedding layer's outputs is the code at patch tokens and 0 elsewhere. Perturbing a
    prefix parameter (CLS, distillation, registers) changes exactly the positions it feeds.
    Returns ({segment: positions of sample 0}, (B, N, 2) codes, N of the tower's final hidden states).
    """
    named = dict(model.hf.named_modules())
    conv_name = next(k for k, v in named.items() if isinstance(v, torch.nn.Conv2d))
    conv, emb = named[conv_name], named[conv_name.split(".patch")[0]]
    seen = {}

    def run(mode: str):
        """One forward; the convolution's output is kept ("real"), zeroed ("zeros") or the (r+1, c+1) codes."""
        def on_conv(module, args, out):
            if mode == "real":
                return out
            planted = torch.zeros_like(out)  # (B, D, rows, cols)
            if mode == "codes":
                planted[:, 0] = torch.arange(out.shape[-2])[:, None] + 1
                planted[:, 1] = torch.arange(out.shape[-1])[None, :] + 1
            return planted

        def on_emb(module, args, out):
            seen["emb"] = (out[0] if isinstance(out, tuple) else out).detach().clone()

        with _hooks((conv, "fwd", on_conv), (emb, "fwd", on_emb)), torch.no_grad():
            out = model.hf(**inputs)
        return seen["emb"], out

    a, out = run("codes")
    b, _ = run("zeros")
    codes = (a - b)[..., :2]  # code + position embedding - position embedding: integers up to rounding
    assert bool(((codes - codes.round()).abs() < 1e-4).all())
    codes = codes.round()
    n_final = (out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state.dim() == 3
               else a).shape[1]
    fed = {}
    names = {"cls_token": "cls", "class_embedding": "cls", "distillation_token": "distillation", "register_tokens": "register"}
    for pname, p in emb.named_parameters(recurse=False):
        if pname not in names:
            continue
        base, _ = run("real")
        with torch.no_grad():
            p.add_(1.0)
            try:
                moved, _ = run("real")
            finally:
                p.sub_(1.0)
        fed[names[pname]] = _positions((moved[0] - base[0]).abs().amax(-1) > 0)
    return fed, codes, n_final


@pytest.mark.parametrize("name", VITS)
def test_vit_prefix_and_grid_match_the_model(name):
    """Prefix segments sit where CLS / distillation / register parameters enter; grid cell (r, c) holds the patch
    the convolution made at (r, c); the sequence is as long as the model's hidden states."""
    model, inputs = _load(name)
    layout = token_layout(model, inputs)
    fed, codes, n_final = _prefix_truth(model, inputs)
    expected_prefix = {"vit": {"cls": 1}, "deit": {"cls": 1, "distillation": 1}, "clip": {"cls": 1}, "siglip": {},
                       "dinov2": {"cls": 1}, "dinov2_reg": {"cls": 1, "register": 4}}[name]
    assert {k: len(v) for k, v in fed.items()} == expected_prefix
    assert layout.segments.shape == (2, n_final) == codes.shape[:2]
    for seg, where in fed.items():
        assert _positions(layout.mask(seg)[0]) == where, seg
        assert bool((layout.mask(seg)[0] == layout.mask(seg)[1]).all())
    assert sorted(layout.names) == sorted(["image", *expected_prefix])
    assert [g.batch for g in layout.grids] == [0, 1]
    for g in layout.grids:
        assert g.shape == (4, 4) and g.patch == 8 and g.name == "image"
        got = codes[g.batch, g.positions]  # (4, 4, 2)
        r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        assert torch.equal(got, torch.stack([r + 1, c + 1], -1).float())
        assert _positions(layout.mask("image")[g.batch]) == set(g.positions.flatten().tolist())
    patch_tokens = _positions(codes[0].abs().amax(-1) > 0)
    assert patch_tokens == _positions(layout.mask("image")[0])


@pytest.mark.parametrize("name", ["llava", "llava_next"])
def test_lvlm_vision_tower_layout_matches_the_tower(name):
    """LLaVA's CLIP tower: CLS then the patches, one row per crop the tower really encodes (LLaVA-NeXT drops the
    zero-padding crops of its (images, max crops, ...) pixel_values)."""
    model, inputs = _load(name)
    layout = token_layout(model, inputs, tower="vision")
    fed, codes, _ = _prefix_truth(model, inputs)
    assert layout.segments.shape == codes.shape[:2]  # (crops, 17)
    assert {k: len(v) for k, v in fed.items()} == {"cls": 1}
    assert _positions(layout.mask("cls")[0]) == fed["cls"]
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    for g in layout.grids:
        assert torch.equal(codes[g.batch, g.positions], torch.stack([r + 1, c + 1], -1).float())
    assert len(layout.grids) == codes.shape[0]


# ----------------------------------------------------------------------------- LLaVA text stream
def _plant_tower(tower, prefix: int):
    """A hook: the tower's hidden states become, for crop g, `prefix` CLS vectors (CLS, g) then patch (r, c) as
    (PATCH, g, r, c) in row-major order (the order the ViT tests establish for CLIP / SigLIP)."""
    def on_tower(module, args, out):
        def fake(h):
            if h is None:
                return None
            n, s, d = h.shape
            side = int(round((s - prefix) ** 0.5))
            x = torch.zeros(n, s, d)
            for g in range(n):
                x[g, :prefix] = _code(d, CLS, g)
                for p in range(side * side):
                    x[g, prefix + p] = _code(d, PATCH, g, p // side, p % side)
            return x

        out.last_hidden_state = fake(out.last_hidden_state)
        if out.hidden_states is not None:
            out.hidden_states = tuple(fake(h) for h in out.hidden_states)
        return out

    return tower, "fwd", on_tower


def _plant_vision_output(model, prefix: int):
    """Hooks: `_plant_tower` on LLaVA's vision tower, and a projector that passes the codes through unchanged (tiny
    vision and text widths are both 32)."""
    def identity(module, args, out):
        return args[0]

    return _plant_tower(model.hf.model.vision_tower, prefix), (model.hf.model.multi_modal_projector, "fwd", identity)


def _llava(tower: str, strategy: str):
    """A tiny LLaVA with a CLIP or SigLIP tower; sample 0 holds images 0 and 1, sample 1 image 2."""
    vision = dict(CLIPV, model_type="siglip_vision_model") if tower == "siglip" else CLIPV
    vision = {k: v for k, v in vision.items() if not (tower == "siglip" and k == "projection_dim")}
    cfg = T.LlavaConfig(vision_config=vision, text_config={"model_type": "llama", **TXT}, image_token_index=IMG_TOK,
                        vision_feature_select_strategy=strategy,
                        vision_feature_layer=-1 if tower == "siglip" else -2)
    torch.manual_seed(0)
    n = 16 + (1 if (tower, strategy) == ("clip", "full") else 0)  # the CLS token travels with "full"
    ids, mask = _ids([[n, n], [n]])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(3, 3, 32, 32)}
    return interp.load_model(T.LlavaForConditionalGeneration(cfg).eval()), inputs


@pytest.mark.parametrize("tower,strategy", [("clip", "default"), ("clip", "full"), ("siglip", "full")])
def test_llava_grid_holds_each_patch_where_the_model_puts_it(tower, strategy):
    model, inputs = _llava(tower, strategy)
    layout = token_layout(model, inputs)
    prefix = 1 if tower == "clip" else 0
    emb = _embeds_seen_by_lm(model, inputs, *_plant_vision_output(model, prefix))[..., :4]
    assert [(g.batch, g.image, g.shape) for g in layout.grids] == [(0, 0, (4, 4)), (0, 1, (4, 4)), (1, 0, (4, 4))]
    r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    for k, g in enumerate(layout.grids):  # crop k of the tower lands on grid k, cell (r, c) on patch (r, c)
        want = torch.stack([torch.full_like(r, PATCH), torch.full_like(r, k), r, c], -1)
        assert torch.equal(emb[g.batch, g.positions], want), k
    n_cls = int((emb[..., 0] == CLS).sum())
    for b, covered in enumerate(_image_sets(layout)):
        image = _positions(layout.mask("image")[b])
        assert covered == _positions(emb[b, :, 0] == PATCH)
        assert image - covered == _positions(emb[b, :, 0] == CLS)  # "full" + CLIP: the CLS token, in no grid
    assert n_cls == (3 if (tower, strategy) == ("clip", "full") else 0)


def test_llava_default_strategy_on_siglip_is_refused():
    """HF's "default" strategy drops the first token, which on SigLIP is a patch: no grid exists."""
    model, inputs = _llava("siglip", "full")
    model.config.vision_feature_select_strategy = "default"
    ids, mask = _ids([[15]])
    with pytest.raises(NotImplementedError, match="drops the first patch"):
        token_layout(model, {"input_ids": ids, "attention_mask": mask})


# ----------------------------------------------------------------------------- LLaVA-NeXT text stream
def _llava_next(sizes: list[list[int]], per_row: list[int], onevision: str | None = None):
    """Tiny LLaVA-NeXT (the tiny_models config) with images of the given original (H, W); per_row: images per sample.
    onevision: a LLaVA-OneVision of the same towers instead, with this `vision_aspect_ratio` ("anyres_max_N"); its
    token counts come from the model itself, one image at a time."""
    hf, _ = make("llava_next")
    crops = [image_size_to_num_patches(s, LN_PINPOINTS, 32) for s in sizes]
    pix = torch.zeros(len(sizes), max(crops), 3, 32, 32)
    for i, n in enumerate(crops):
        pix[i, :n] = torch.randn(n, 3, 32, 32)
    tokens = [llava_next_num_image_tokens(*s) for s in sizes]  # hand copy of the processor's count
    if onevision:
        cfg = T.LlavaOnevisionConfig(vision_config=hf.config.vision_config, text_config=hf.config.text_config,
                                     image_token_index=IMG_TOK, image_grid_pinpoints=LN_PINPOINTS,
                                     vision_feature_select_strategy="default", vision_feature_layer=-2,
                                     vision_aspect_ratio=onevision)
        torch.manual_seed(0)
        hf = T.LlavaOnevisionForConditionalGeneration(cfg).eval()
        with torch.no_grad():
            tokens = [hf.model.get_image_features(pixel_values=pix[i:i + 1], image_sizes=torch.tensor([size]),
                                                  vision_feature_layer=-2, vision_feature_select_strategy="default",
                                                  vision_aspect_ratio=onevision).pooler_output[0].shape[0]
                      for i, size in enumerate(sizes)]
    rows, i = [], 0
    for n in per_row:
        rows.append(tokens[i : i + n])
        i += n
    ids, mask = _ids(rows)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pix, "image_sizes": torch.tensor(sizes)}
    return interp.load_model(hf), inputs, crops


@pytest.mark.parametrize("onevision", [None, "anyres_max_9"])
@pytest.mark.parametrize("sizes,per_row", [
    ([[30, 60], [50, 40]], [1, 1]),            # the tiny_models inputs: 1×2 tiles as is; 2×2 tiles, columns unpadded
    ([[12, 64], [64, 64], [50, 40]], [2, 1]),  # rows unpadded (4 -> 2); two images in sample 0
])
def test_llava_next_grids_hold_each_tile_patch_where_the_model_puts_it(sizes, per_row, onevision):
    """Every crop patch is planted as (PATCH, crop, r, c) and image_newline as NEWLINE; the model itself splits
    crops per image, stitches the tiles, unpads and adds newlines. Base grid (r, c) must hold base-crop patch
    (r, c); tiles grid (r, c) must hold the stitched-canvas cell (r0 + r, c0 + c) for one offset (r0, c0); the
    positions marked image_newline must be exactly the newline vectors. LLaVA-OneVision below its anyres_max
    limit lays images out the same way."""
    model, inputs, crops = _llava_next(sizes, per_row, onevision)
    layout = token_layout(model, inputs)
    with torch.no_grad():
        model.hf.model.image_newline.copy_(_code(32, NEWLINE))
    emb = _embeds_seen_by_lm(model, inputs, *_plant_vision_output(model, 1))[..., :4]
    side = 4
    assert [g.name for g in layout.grids] == ["image_base", "image_tiles"] * len(sizes)
    expected_batch = [b for b, n in enumerate(per_row) for _ in range(n)]
    first = [sum(crops[:i]) for i in range(len(sizes))]
    r, c = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    for i, size in enumerate(sizes):
        base, tiles = layout.grids[2 * i], layout.grids[2 * i + 1]
        assert base.batch == tiles.batch == expected_batch[i] and base.image == tiles.image
        b = base.batch
        want = torch.stack([torch.full_like(r, PATCH), torch.full_like(r, first[i]), r, c], -1)
        assert torch.equal(emb[b, base.positions], want), ("base", i)
        got = emb[b, tiles.positions]  # (rows, cols, 4): (PATCH, crop, row in crop, col in crop)
        assert bool((got[..., 0] == PATCH).all())
        tile = got[..., 1].long() - first[i] - 1  # tile index, row-major over the processor's tile grid
        assert bool(((tile >= 0) & (tile < crops[i] - 1)).all())
        npw = select_best_resolution(size, LN_PINPOINTS)[1] // 32
        canvas_r = tile // npw * side + got[..., 2].long()
        canvas_c = tile % npw * side + got[..., 3].long()
        rows, cols = tiles.shape
        assert bool((canvas_r - torch.arange(rows)[:, None] == canvas_r[0, 0]).all()), ("rows", i)
        assert bool((canvas_c - torch.arange(cols)[None, :] == canvas_c[0, 0]).all()), ("cols", i)
    for b, covered in enumerate(_image_sets(layout)):
        newline = _positions(emb[b, :, 0] == NEWLINE)
        assert _positions(layout.mask("image_newline")[b]) == newline
        assert covered == _positions(emb[b, :, 0] == PATCH)
        assert _positions(layout.mask("image")[b]) | newline == covered | newline
        assert not (covered & newline)
    # the newline closes each tiles row: there is one per row of the tiles grid
    for b in range(len(per_row)):
        n_rows = sum(g.shape[0] for g in layout.grids if g.name == "image_tiles" and g.batch == b)
        assert int((emb[b, :, 0] == NEWLINE).sum()) == n_rows


def test_llava_onevision_grid_of_a_canvas_resized_down():
    """Above `anyres_max_N` base images, LLaVA-OneVision resizes the stitched canvas (bilinear) before adding the
    newlines: the tiles grid takes the resized shape, its cells hold (blended) patch codes, and a newline closes
    each of its rows."""
    model, inputs, _ = _llava_next([[64, 64], [30, 60]], [1, 1], onevision="anyres_max_1")
    layout = token_layout(model, inputs)
    with torch.no_grad():
        model.hf.model.image_newline.copy_(_code(32, NEWLINE))
    emb = _embeds_seen_by_lm(model, inputs, *_plant_vision_output(model, 1))[..., :4]
    tiles = [g for g in layout.grids if g.name == "image_tiles"]
    assert [g.shape for g in tiles] == [(4, 4), (2, 5)]  # canvases 8×8 and 4×8 against 1 base image of 4×4:
    # ratios 2 and √2, so ⌊8 / 2⌋ × ⌊8 / 2⌋ and ⌊4 / √2⌋ × ⌊8 / √2⌋
    for b, covered in enumerate(_image_sets(layout)):
        newline = _positions(emb[b, :, 0] == NEWLINE)
        assert _positions(layout.mask("image_newline")[b]) == newline
        assert covered == _positions(emb[b, :, 0] == PATCH)
        assert len(newline) == tiles[b].shape[0]


# ----------------------------------------------------------------------------- Qwen2-VL / Qwen2.5-VL
QWEN_GRIDS = {"qwen2_vl": [[1, 4, 4], [1, 4, 6], [1, 6, 4]], "qwen2_5_vl": [[1, 4, 4], [1, 8, 8], [1, 4, 8]],
              "qwen3_vl": [[1, 4, 4], [1, 4, 6], [1, 6, 4]]}


def _qwen(name: str):
    """Tiny Qwen2(.5)-VL with three images: sample 0 holds images 0 and 1, sample 1 image 2."""
    hf, _ = make(name)
    grids, m = QWEN_GRIDS[name], hf.config.vision_config.spatial_merge_size
    v = hf.config.vision_config
    n_patches = sum(t * h * w for t, h, w in grids)
    tokens = [t * h * w // m**2 for t, h, w in grids]
    ids, mask = _ids([tokens[:2], tokens[2:]])
    inputs = {"input_ids": ids, "attention_mask": mask,
              "pixel_values": torch.randn(n_patches, v.in_channels * v.temporal_patch_size * v.patch_size**2),
              "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (ids == IMG_TOK).int()}
    return interp.load_model(hf), inputs


def _vision_positions_hooks(model, seen: dict):
    """Pre-hooks on the vision blocks recording what the blocks see: the rotary (cos, sin) and every cu_seqlens."""
    def grab(module, args, kwargs):
        seen.setdefault("rope", kwargs["position_embeddings"])
        seen.setdefault("cu", []).append(kwargs["cu_seqlens"])

    return [(blk, "pre", grab) for blk in model.hf.model.visual.blocks]


def _decode_hw_image(model, seen: dict) -> torch.Tensor:
    """(S, 3): (h, w, image) of every token of the vision blocks' sequence, read from the model's own rotary angles
    (lowest frequency, so no wrap-around) and from its full-attention image boundaries (the fewest cu_seqlens)."""
    cos, sin = seen["rope"]
    inv = model.hf.model.visual.rotary_pos_emb.inv_freq
    q = cos.shape[-1] // 4  # columns [0, q): h frequencies, [q, 2q): w frequencies
    angle = torch.stack([torch.atan2(sin[:, q - 1], cos[:, q - 1]), torch.atan2(sin[:, 2 * q - 1], cos[:, 2 * q - 1])], -1)
    hw = angle / inv[-1]
    assert bool(((hw - hw.round()).abs() < 1e-3).all())
    cu = min(seen["cu"], key=len)
    image = torch.searchsorted(cu, torch.arange(cos.shape[0], dtype=cu.dtype), right=True) - 1
    return torch.cat([hw.round().long(), image[:, None].long()], -1)


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_tower_grid_matches_the_rotary_positions(name):
    """Vision tower: the token at grid cell (r, c) of image k is, in the sequence the vision blocks attend over,
    the one the model rotates as (h, w) = (r, c) inside image k. Qwen2.5-VL permutes it into window order."""
    model, inputs = _qwen(name)
    layout = token_layout(model, inputs, tower="vision")
    seen = {}
    with _hooks(*_vision_positions_hooks(model, seen)), torch.no_grad():
        model.hf(**inputs)
    hwi = _decode_hw_image(model, seen)
    assert layout.segments.shape == (1, hwi.shape[0])
    assert [(g.batch, g.image, g.shape) for g in layout.grids] == [(0, k, (h, w)) for k, (_, h, w) in enumerate(QWEN_GRIDS[name])]
    all_positions = []
    for k, g in enumerate(layout.grids):
        h, w = g.shape
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        assert torch.equal(hwi[g.positions], torch.stack([r, c, torch.full_like(r, k)], -1)), k
        all_positions += g.positions.flatten().tolist()
    assert sorted(all_positions) == list(range(hwi.shape[0]))


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_text_grid_holds_each_merged_block_where_the_model_puts_it(name):
    """Text stream: the merger's output for the m×m block at (R, C) of image k (read from the rotary angles of
    the m² tokens it merges) is planted as (PATCH, k, R, C); the layout's grid k, cell (R, C) must hold it."""
    model, inputs = _qwen(name)
    layout = token_layout(model, inputs)
    m = model.config.vision_config.spatial_merge_size
    seen = {}

    def on_merger(module, args, out):
        hwi = _decode_hw_image(model, seen).view(-1, m * m, 3)  # merger input is in the blocks' order
        block = torch.stack([hwi[..., 0] // m, hwi[..., 1] // m, hwi[..., 2]], -1)
        assert bool((block == block[:, :1]).all()), "a merged token mixes two blocks"
        codes = torch.zeros(out.shape)
        for j, (br, bc, k) in enumerate(block[:, 0].tolist()):
            codes[j] = _code(out.shape[-1], PATCH, k, br, bc)
        return codes

    emb = _embeds_seen_by_lm(model, inputs, *_vision_positions_hooks(model, seen),
                             (model.hf.model.visual.merger, "fwd", on_merger))[..., :4]
    shapes = [(h // m, w // m) for _, h, w in QWEN_GRIDS[name]]
    assert [(g.batch, g.image, g.shape) for g in layout.grids] == [(0, 0, shapes[0]), (0, 1, shapes[1]), (1, 0, shapes[2])]
    for k, g in enumerate(layout.grids):
        r, c = torch.meshgrid(torch.arange(g.shape[0]), torch.arange(g.shape[1]), indexing="ij")
        want = torch.stack([torch.full_like(r, PATCH), torch.full_like(r, k), r, c], -1).float()
        assert torch.equal(emb[g.batch, g.positions], want), k
    for b, covered in enumerate(_image_sets(layout)):
        assert covered == _positions(emb[b, :, 0] == PATCH) == _positions(layout.mask("image")[b])


def test_gemma3_grid_holds_each_pooled_cell_where_the_model_puts_it():
    """Gemma 3 pools the SigLIP patches (codes (PATCH, k, r, c) planted at the tower's output, row-major as the
    ViT tests establish) into mm_tokens_per_image cells; what the projector's norm receives, read back, says which
    block each pooled token averaged, and that block's code (PATCH, k, R, C) replaces the projector's output. The
    layout's grid k, cell (R, C) must hold it in the language model's input."""
    hf, inputs = make("gemma3_vlm")
    model = interp.load_model(hf)
    layout = token_layout(model, inputs)
    projector = model.hf.model.multi_modal_projector
    kernel = projector.kernel_size
    seen = {}

    def on_norm(module, args, kwargs):
        seen["pooled"] = args[0].detach().clone()  # (images, cells, D): the average of each block's codes

    def on_projector(module, args, out):
        pooled = seen["pooled"]
        codes = torch.zeros(out.shape)
        for k in range(pooled.shape[0]):
            for j in range(pooled.shape[1]):
                _, image, r, c = pooled[k, j, :4].tolist()
                codes[k, j] = _code(out.shape[-1], PATCH, image, (r - (kernel - 1) / 2) / kernel,
                                    (c - (kernel - 1) / 2) / kernel)
        return codes

    emb = _embeds_seen_by_lm(model, inputs, _plant_tower(model.hf.model.vision_tower, 0),
                             (projector.mm_soft_emb_norm, "pre", on_norm), (projector, "fwd", on_projector))[..., :4]
    side = int(model.config.mm_tokens_per_image ** 0.5)
    assert [(g.batch, g.image, g.shape) for g in layout.grids] == [(0, 0, (side, side)), (1, 0, (side, side))]
    assert layout.grids[0].patch == 8 * kernel  # pixels per cell side
    r, c = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    for k, g in enumerate(layout.grids):
        want = torch.stack([torch.full_like(r, PATCH), torch.full_like(r, k), r, c], -1)
        assert torch.equal(emb[g.batch, g.positions], want), k
    for b, covered in enumerate(_image_sets(layout)):
        assert covered == _positions(emb[b, :, 0] == PATCH) == _positions(layout.mask("image")[b])


@pytest.mark.parametrize("model_type", ["mistral3", "aya_vision"])
def test_discovered_lvlm_marks_its_image_tokens_without_a_grid(model_type, monkeypatch):
    """An LVLM with no hand table: found as an LVLM from the model, its image tokens (the config's image token id)
    are the `image` segment; no grid is claimed, and its vision tower's layout is refused by name."""
    from auto_tiny import tiny_config

    cfg = tiny_config(model_type)
    hf = T.AutoModelForImageTextToText.from_config(cfg)
    model = interp.load_model(hf)
    assert model.family.kind == "lvlm" and model.family.image_layout == "tokens"
    image = interp.families.image_token(cfg)
    ids = torch.tensor([[5, 6, image, image, image, 7, image, image, 8]])
    layout = token_layout(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert _positions(layout.mask("image")[0]) == {2, 3, 4, 6, 7} and layout.grids == []
    with pytest.raises(ValueError, match=f"{model_type}.*the layout of its vision tower is not known"):
        token_layout(model, {"input_ids": ids, "pixel_values": torch.zeros(1, 3, 8, 8)}, tower="vision")
    for key in ("image_token_id", "image_token_index"):  # a config naming no image token (strict fields: no None)
        monkeypatch.delitem(vars(model.config), key, raising=False)
        monkeypatch.setattr(type(model.config), key, None, raising=False)
    with pytest.raises(ValueError, match="names no image token id .*cannot be located"):
        token_layout(model, {"input_ids": ids})


@pytest.mark.parametrize("name", ["internvl", "idefics3"])
def test_tile_grids_hold_each_shuffled_block_where_the_model_puts_it(name):
    """InternVL and Idefics3 pixel-shuffle each tile's patches, 2 × 2 into one token. Patch (r, c) of real tile g is
    planted as (PATCH, g, r, c) at the vision tower's output (row-major, after InternVL's CLS); what the projector
    receives says which four patches each token holds (they must form one 2 × 2 block (R, C)), and (PATCH, g, R, C)
    replaces the projector's output. The layout's grid g, cell (R, C) must hold it."""
    hf, inputs = make(name)
    model = interp.load_model(hf)
    layout = token_layout(model, inputs)
    inner = model.hf.model
    tower, prefix = (inner.vision_tower, 1) if name == "internvl" else (inner.vision_model, 0)
    projector = inner.multi_modal_projector if name == "internvl" else inner.connector.modality_projection
    d = model.config.vision_config.hidden_size

    def on_projector(module, args, out):
        shuffled = args[0]  # (tiles, tokens, 4 · d): each token's four patches, d channels each
        codes = torch.zeros(out.shape)
        for g in range(shuffled.shape[0]):
            for t in range(shuffled.shape[1]):
                parts = shuffled[g, t].view(4, d)[:, :4]
                assert bool((parts[:, 0] == PATCH).all()) and bool((parts[:, 1] == parts[0, 1]).all())
                rows, cols = parts[:, 2], parts[:, 3]
                r0, c0 = rows.min(), cols.min()
                assert sorted(zip((rows - r0).tolist(), (cols - c0).tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
                codes[g, t] = _code(out.shape[-1], PATCH, parts[0, 1], r0 // 2, c0 // 2)
        return codes

    emb = _embeds_seen_by_lm(model, inputs, _plant_tower(tower, prefix),
                             (projector, "fwd", on_projector))[..., :4]
    side = 4
    assert [(g.batch, g.image, g.shape) for g in layout.grids] == [(0, 0, (side, side)), (0, 1, (side, side)),
                                                                   (1, 0, (side, side))]
    assert layout.grids[0].patch == 8  # pixels per token side: 4 px patches, 2 × 2 shuffled
    r, c = torch.meshgrid(torch.arange(float(side)), torch.arange(float(side)), indexing="ij")
    for k, g in enumerate(layout.grids):  # the real tiles in order: 0, 1 of sample 0, then 2
        want = torch.stack([torch.full_like(r, PATCH), torch.full_like(r, k), r, c], -1)
        assert torch.equal(emb[g.batch, g.positions], want), k
    for b, covered in enumerate(_image_sets(layout)):
        assert covered == _positions(emb[b, :, 0] == PATCH) == _positions(layout.mask("image")[b])


# ----------------------------------------------------------------------------- text models
def test_bos_only_at_the_first_real_token_and_pad_where_masked():
    model, inputs = _load("llama")
    bos = model.config.bos_token_id
    ids, mask = inputs["input_ids"].clone(), inputs["attention_mask"]  # row 1: positions 0-2 are padding
    ids[0, 0], ids[0, 5], ids[1, 0], ids[1, 3], ids[1, 7] = bos, bos, bos, bos, bos
    layout = token_layout(model, {"input_ids": ids, "attention_mask": mask})
    assert _positions(layout.mask("bos")[0]) == {0} and _positions(layout.mask("bos")[1]) == {3}
    assert _positions(layout.mask("pad")[1]) == {0, 1, 2} and not layout.mask("pad")[0].any()
    assert layout.spans("text", 1) == [(4, ids.shape[1])]
    assert layout.spans("bos", 0) == [(0, 1)]
    # no padding, no BOS at the start: neither segment exists
    plain = token_layout(model, {"input_ids": inputs["input_ids"][:1]})
    assert plain.names == ["text"] and plain.spans("bos") == []
    with pytest.raises(KeyError, match="no segment 'bos'"):
        plain.mask("bos")


def test_encoder_cls_and_sep_from_the_tokenizer_ids():
    hf, inputs = make("bert")
    model = interp.load_model(hf, tokenizer=SimpleNamespace(cls_token_id=1, sep_token_id=2))
    ids, mask = inputs["input_ids"].clone(), torch.ones_like(inputs["input_ids"])
    ids[:, 0], ids[0, 6], ids[0, -1], ids[1, -1] = 1, 2, 2, 2
    mask[1, -3:] = 0  # right padding after the [SEP] that sits at position -1 of row 1 -> padding wins there
    layout = token_layout(model, {"input_ids": ids, "attention_mask": mask})
    n = ids.shape[1]
    assert _positions(layout.mask("cls")[0]) == {0} == _positions(layout.mask("cls")[1])
    assert _positions(layout.mask("sep")[0]) == {6, n - 1} and not layout.mask("sep")[1].any()
    assert _positions(layout.mask("pad")[1]) == {n - 3, n - 2, n - 1}
    assert "bos" not in layout.names


@pytest.fixture(scope="module")
def stories():
    model = interp.load_model("stories260k")
    texts = ["Once upon a time there was a little cat named Tom.", "Tom liked the cat."]
    rows = [model.tokenizer(t)["input_ids"] for t in texts]
    n = max(map(len, rows))
    ids, mask = torch.zeros(2, n, dtype=torch.long), torch.zeros(2, n, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
    return model, {"input_ids": ids, "attention_mask": mask}


def test_add_text_span_marks_the_tokens_that_decode_to_the_text(stories):
    model, inputs = stories
    layout = token_layout(model, inputs)
    assert _positions(layout.mask("bos")[0]) == {0} and _positions(layout.mask("bos")[1]) == {6}
    tok, ids = model.tokenizer, inputs["input_ids"]
    for text, batch in [("little cat", 0), ("Tom", 0), ("Tom", 1), ("the cat", 1)]:
        name = f"{text}@{batch}"
        layout.add_text_span(name, text, ids, tok, batch=batch)
        (start, end), = layout.spans(name, batch)
        assert tok.decode(ids[batch, start:end]).strip() == text
        assert not layout.mask(name)[1 - batch].any()
    # first occurrence: "Tom" in sample 1 is its first word, right after the BOS at position 6
    assert layout.spans("Tom@1", 1) == [(7, 9)]
    # "the" is inside the token "there" in sample 0: not whole tokens
    with pytest.raises(ValueError, match="does not occur as whole tokens"):
        layout.add_text_span("the", "the", ids, tok, batch=0)
    with pytest.raises(ValueError, match="does not occur"):
        layout.add_text_span("dog", "dog", ids, tok, batch=1)


def test_add_span_marks_one_sample_or_all_and_refuses_spans_outside(stories):
    model, inputs = stories
    layout = token_layout(model, inputs)
    n = layout.segments.shape[1]
    i = layout.add_span("needle", 2, 5, batch=1)
    assert layout.names[i] == "needle" and layout.spans("needle", 1) == [(2, 5)] and layout.spans("needle", 0) == []
    assert layout.add_span("needle", n - 2, n) == i  # an existing name keeps its id, all samples
    assert layout.spans("needle", 0) == [(n - 2, n)] and layout.spans("needle", 1) == [(2, 5), (n - 2, n)]
    for start, end in [(5, n + 1), (-1, 3), (4, 4), (6, 2)]:
        with pytest.raises(ValueError, match="outside the input"):
            layout.add_span("bad", start, end)
    assert "bad" not in layout.names


# ----------------------------------------------------------------------------- clear errors
def test_clear_errors():
    llava, li = _load("llava")
    with pytest.raises(ValueError, match="pixel_values"):
        token_layout(llava, {"input_ids": li["input_ids"]}, tower="vision")
    with pytest.raises(ValueError, match="needs input_ids"):
        token_layout(llava, {"pixel_values": li["pixel_values"]})
    with pytest.raises(ValueError, match="image tokens"):  # one image token short of two whole images
        token_layout(llava, {"input_ids": _ids([[16], [15]])[0]})

    qwen, qi = _load("qwen2_vl")
    no_thw = {k: v for k, v in qi.items() if k != "image_grid_thw"}
    for tower in (None, "vision"):
        with pytest.raises(ValueError, match="image_grid_thw"):
            token_layout(qwen, no_thw, tower=tower)
    with pytest.raises(ValueError, match="image tokens"):  # the grids say 4 + 6 merged tokens, not 4 + 4
        token_layout(qwen, {**qi, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 4]])})

    nxt, ni = _load("llava_next")
    no_sizes = {k: v for k, v in ni.items() if k != "image_sizes"}
    for tower in (None, "vision"):
        with pytest.raises(ValueError, match="image_sizes"):
            token_layout(nxt, no_sizes, tower=tower)
    with pytest.raises(ValueError, match="image tokens"):
        token_layout(nxt, {**ni, "image_sizes": torch.tensor([[64, 64], [50, 40]])})

    llama, _ = _load("llama")
    with pytest.raises(ValueError, match="no tower 'vision'"):
        token_layout(llama, {"input_ids": torch.ones(1, 3, dtype=torch.long)}, tower="vision")
