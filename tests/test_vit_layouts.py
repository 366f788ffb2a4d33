"""ViT token layouts taken from the model and checked against it (issue 29): DINOv3 (CLS + registers), ViT-MAE (masked
patches dropped), SigLIP2 (NaFlex grids with padding), DeiT, Dinov2 with registers and the families that worked
before. Truth comes from the model's own forward: the patch convolution's output planted with each cell's (row, col)
and the prefix parameters perturbed (`_prefix_truth`), the model's own MAE mask, SigLIP2's position embeddings
resized by `F.interpolate`; the `vit` distances and `sinks` masses against dense eager attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import interp
from interp import token_layout
from interp.analyses import get_analysis
from interp.layout import fixed_masking
from test_layout import _positions, _prefix_truth
from tiny_models import VIT, make, vit_processor


def _build(name: str, attn: str = "sdpa"):
    """(model, inputs) of a tiny random ViT: 32 px, 8 px patches (a 4 × 4 grid), batch 2."""
    if name not in ("dinov3", "mae", "beit"):
        hf, inputs = make(name, attn)
        return interp.load_model(hf, processor=vit_processor()), inputs
    torch.manual_seed(0)
    hf = {"dinov3": lambda: T.DINOv3ViTModel(T.DINOv3ViTConfig(**VIT, num_register_tokens=4)),
          "mae": lambda: T.ViTMAEModel(T.ViTMAEConfig(**VIT)),  # mask_ratio 0.75: 4 of 16 patches kept
          "beit": lambda: T.BeitModel(T.BeitConfig(**VIT, use_relative_position_bias=True))}[name]()
    hf.set_attn_implementation(attn)
    inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    if name == "mae":  # a different set of kept patches per image
        inputs["noise"] = torch.rand(2, 16, generator=torch.Generator().manual_seed(3))
    return interp.load_model(hf.eval(), processor=vit_processor()), inputs


PREFIX = {"vit": {"cls": 1}, "deit": {"cls": 1, "distillation": 1}, "clip": {"cls": 1}, "siglip": {},
          "dinov2": {"cls": 1}, "dinov2_reg": {"cls": 1, "register": 4}, "dinov3": {"cls": 1, "register": 4},
          "mae": {"cls": 1}}


@pytest.mark.parametrize("name", list(PREFIX))
def test_layout_is_the_models_sequence(name):
    """The layout is as long as the tower's hidden states; each prefix segment sits where its parameter (CLS,
    distillation, registers) enters; grid cell (r, c) holds the token the convolution's patch (r, c) became, every
    patch token is on the grid, and a cell without a token (ViT-MAE's masked patches) is -1."""
    model, inputs = _build(name)
    layout = token_layout(model, inputs)
    fed, codes, n_final = _prefix_truth(model, inputs)
    assert {k: len(v) for k, v in fed.items()} == PREFIX[name]
    assert layout.segments.shape == (2, n_final) == codes.shape[:2]
    assert sorted(layout.names) == sorted(["image", *PREFIX[name]])
    for seg, where in fed.items():
        for b in range(2):
            assert _positions(layout.mask(seg)[b]) == where, seg
    kept_by_model = None
    if name == "mae":
        with torch.no_grad():
            kept_by_model = model.hf(**inputs).mask.view(2, 4, 4) == 0  # the model's own mask: 0 = kept
    assert [g.batch for g in layout.grids] == [0, 1]
    r, c = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    for g in layout.grids:
        assert g.shape == (4, 4) and g.patch == 8
        on = g.positions >= 0
        if kept_by_model is not None:
            assert torch.equal(on, kept_by_model[g.batch]) and int(on.sum()) == 4
        else:
            assert bool(on.all())
        want = torch.stack([r + 1, c + 1], -1).float()
        assert torch.equal(codes[g.batch, g.positions[on]], want[on])
        assert _positions(layout.mask("image")[g.batch]) == set(g.positions[on].tolist())
        assert _positions(codes[g.batch].abs().amax(-1) > 0) == set(g.positions[on].tolist())
    if name == "mae":
        assert layout.grids[0].positions.tolist() != layout.grids[1].positions.tolist()  # per-image noise


def _siglip2(shapes: list[tuple[int, int]], n: int = 16):
    """A tiny SigLIP2 tower (a 4 × 4 position grid) and NaFlex inputs: image b a shapes[b] grid, padded to n."""
    torch.manual_seed(0)
    cfg = T.Siglip2VisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                patch_size=8, num_patches=16)
    model = interp.load_model(T.Siglip2VisionModel(cfg).eval())
    real = torch.tensor([[1] * (h * w) + [0] * (n - h * w) for h, w in shapes])
    return model, {"pixel_values": torch.randn(len(shapes), n, 3 * 8 * 8), "spatial_shapes": torch.tensor(shapes),
                   "pixel_attention_mask": real}


@pytest.mark.parametrize("shapes", [[(4, 4), (4, 4)], [(2, 6), (4, 4), (3, 5)]], ids=["square", "naflex_padded"])
def test_siglip2_grid_from_spatial_shapes(shapes):
    """Grid b is spatial_shapes[b]; the token at cell (r, c) carries the position embedding the model resizes to
    (r, c) (the 4 × 4 table through bilinear antialiased `F.interpolate`, as SigLIP2 was trained); padded patch tokens
    are `pad`, on no grid; the layout is as long as the sequence the tower sees."""
    model, inputs = _siglip2(shapes)
    layout = token_layout(model, inputs)
    emb = model.hf.embeddings
    seen = {}
    zero = emb.patch_embedding.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
    grab = emb.register_forward_hook(lambda m, a, out: seen.setdefault("x", out.detach()))
    try:
        with torch.no_grad():
            hidden = model.hf(**inputs).last_hidden_state
    finally:
        zero.remove()
        grab.remove()
    assert layout.segments.shape == hidden.shape[:2]
    table = emb.position_embedding.weight.detach().reshape(4, 4, -1).permute(2, 0, 1)[None]  # (1, D, 4, 4)
    assert [g.shape for g in layout.grids] == [tuple(s) for s in shapes]
    for g, (h, w) in zip(layout.grids, shapes):
        want = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        got = seen["x"][g.batch, g.positions]                       # (h, w, D)
        torch.testing.assert_close(got, want.permute(1, 2, 0), atol=1e-5, rtol=1e-5)
        assert _positions(layout.mask("image")[g.batch]) == set(range(h * w))
        pad = _positions(layout.mask("pad")[g.batch]) if "pad" in layout.names else set()
        assert pad == set(range(h * w, 16))
    assert ("pad" in layout.names) == any(h * w < 16 for h, w in shapes)


def test_siglip2_attention_mask_that_is_not_a_prefix_is_refused():
    model, inputs = _siglip2([(2, 6), (4, 4)])
    inputs["pixel_attention_mask"] = inputs["pixel_attention_mask"].flip(1)
    with pytest.raises(ValueError, match="pixel_attention_mask of image 0 does not mark its first 2·6"):
        token_layout(model, inputs)


def test_a_layout_of_the_wrong_length_is_an_error_naming_both():
    """A config that misstates the registers: the layout (CLS + 2 registers + 16 patches) is refused against the 21
    tokens the tower sees, not laid over them."""
    model, inputs = _build("dinov3")
    model.config.num_register_tokens = 2
    with pytest.raises(ValueError, match=r"layout of the vision tower has 19 positions .*blocks see 21"):
        token_layout(model, inputs)


def test_mae_without_noise_is_refused_and_fixed_masking_is_repeatable():
    model, inputs = _build("mae")
    del inputs["noise"]
    with pytest.raises(ValueError, match="drops a random 75% of the patches.*noise"):
        token_layout(model, inputs)
    a, b = fixed_masking(model, inputs), fixed_masking(model, dict(inputs))
    assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["noise"][0], a["noise"][1])
    with torch.no_grad():
        kept = model.hf(**a).mask == 0
    for g in token_layout(model, a).grids:
        assert torch.equal(g.positions.reshape(-1) >= 0, kept[g.batch])


def _eager_distance(model, inputs: dict) -> np.ndarray:
    """(L, H) mean attention distance in patches of the patch queries on the patch keys (renormalised), from eager
    attention probabilities, each image's kept patches at their cells."""
    with torch.no_grad():
        att = model.hf(**inputs, output_attentions=True).attentions
    out = np.zeros((len(att), att[0].shape[1]))
    grids = token_layout(model, inputs).grids
    for g in grids:
        pos, cells = g.kept()
        dist = torch.cdist(cells.double(), cells.double())
        for layer, a in enumerate(att):
            p = a[g.batch].double()[:, pos][:, :, pos]
            p = p / p.sum(-1, keepdim=True)
            out[layer] += ((p * dist).sum(-1).mean(-1) / len(grids)).numpy()
    return out


@pytest.mark.parametrize("name", ["dinov3", "mae"])
def test_vit_and_sinks_end_to_end_equal_eager(name):
    """`vit` distances equal eager attention over the patch grid (ViT-MAE: the kept patches only); `sinks` runs, its
    CLS (and register) masses equal eager attention; its token-norm figure puts ViT-MAE's tokens at their cells."""
    model, _ = _build(name, attn="eager")
    vit = interp.score(model, "vit", samples=1, batch=3)
    inputs = get_analysis("vit").sample_inputs(model, vit.meta["plan"][0], None, vit.meta["params"])
    want = _eager_distance(model, inputs)
    got = vit.heads.sort_values(["layer", "head"])["distance"].to_numpy().reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4)

    sinks = interp.score(model, "sinks", samples=2)
    analysis = get_analysis("sinks")
    prefix = {"dinov3": {"cls": [0], "register": [1, 2, 3, 4]}, "mae": {"cls": [0]}}[name]
    assert {f"{s}_mass" for s in prefix} <= set(sinks.scores)
    masses = {s: np.zeros((2, 4)) for s in prefix}
    for sample in sinks.meta["plan"]:
        inputs = analysis.sample_inputs(model, sample, None, sinks.meta["params"])
        assert token_layout(model, inputs).segments.shape[1] == (21 if name == "dinov3" else 5)
        with torch.no_grad():
            att = model.hf(**inputs, output_attentions=True).attentions
        for s, where in prefix.items():
            for layer, a in enumerate(att):
                masses[s][layer] += a[0][:, :, where].sum(-1).mean(-1).numpy() / len(sinks.meta["plan"])
    heads = sinks.heads.sort_values(["layer", "head"])
    for s, m in masses.items():
        np.testing.assert_allclose(heads[f"{s}_mass"].to_numpy().reshape(2, 4), m, rtol=1e-4, atol=1e-6)
    figures = analysis.view(sinks)
    grid = [f for f in figures if any(t.type == "heatmap" for t in f.data)]
    if name == "mae":  # 4 of 16 cells hold a token; the others are blank
        values = np.array(next(t for t in grid[0].data if t.type == "heatmap").z, dtype=float)
        assert values.shape == (4, 4) and int(np.isfinite(values).sum()) == 4


@pytest.mark.parametrize("analysis", ["sinks", "vit"])
def test_beit_relative_position_bias_is_refused_by_capture(analysis):
    """BEiT adds a learned relative position bias to its logits: the user sees capture's refusal, not an IndexError."""
    model, _ = _build("beit")
    with torch.no_grad():  # initialised to zeros, which add nothing: a trained bias does
        for name, p in model.hf.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    with pytest.raises(ValueError, match=r"beit\): vision layer 0 adds a bias to its attention logits .*not supported"):
        interp.score(model, analysis, samples=1)


def test_taxonomy_distance_on_vit_mae_equals_eager_over_the_kept_patches():
    """taxonomy's ViT distance uses only the grid cells that hold a token (ViT-MAE keeps 4 of 16), with the same
    fixed masking as its forward: equal to eager attention over those patches."""
    model, _ = _build("mae", attn="eager")
    run = interp.score(model, "taxonomy", samples=1)
    inputs = get_analysis("taxonomy").sample_inputs(model, run.meta["plan"][0], None, run.meta["params"])
    want = _eager_distance(model, inputs)
    got = run.heads.sort_values(["layer", "head"])["distance"].to_numpy().reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4)
