"""The `vit` analysis: distances and strength profiles equal eager attention; head pruning equals an independent
ablation at the output projection's input; on organism-vit, important heads matter more than unimportant ones."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

import interp
from tiny_models import vit_processor


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      image_size=32, patch_size=8, num_labels=3)
    hf = T.ViTForImageClassification(cfg).eval()
    hf.set_attn_implementation("eager")
    return interp.load_model(hf, processor=vit_processor())


def _ablated_logits(model, inputs, layer, head, value=None):
    """Logits with one head's slice of o_proj's input zeroed (or set to `value`), by a hook independent of
    interp's attention wrapper; also returns the clean slice (B, N, d)."""
    o_proj = model.hf.vit.layers[layer].attention.o_proj
    d = model.hf.config.hidden_size // model.hf.config.num_attention_heads
    seen = {}

    def hook(module, args):
        x = args[0].clone()
        seen["z"] = x[..., head * d:(head + 1) * d].clone()
        x[..., head * d:(head + 1) * d] = 0 if value is None else value
        return (x,)
    handle = o_proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            return model.hf(**inputs).logits.float(), seen["z"]
    finally:
        handle.remove()


def test_vit_heads_equal_eager_and_independent_ablation(classifier):
    result = interp.score(classifier, "vit", samples=1, batch=6)
    analysis = interp.analyses.get_analysis("vit")
    inputs = analysis.sample_inputs(classifier, result.meta["plan"][0], None, result.meta["params"])
    with torch.no_grad():
        out = classifier.hf(**inputs, output_attentions=True)
    labels = out.logits.argmax(-1)  # no labels: the full model's own predictions
    pos = interp.layout.token_layout(classifier, inputs).grids[0].positions.reshape(-1)
    cells = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij"), -1).reshape(-1, 2).double()
    dist = torch.cdist(cells, cells)
    strength = result.tables["strength"]
    for layer, a in enumerate(out.attentions):
        p = a.double()[:, :, pos][:, :, :, pos]
        p = p / p.sum(-1, keepdim=True)
        heads = result.heads[result.heads["layer"] == layer].sort_values("head")
        np.testing.assert_allclose(heads["distance"], (p * dist).sum(-1).mean((0, 2)), rtol=1e-4)
        for head in range(4):
            rows = strength[(strength["layer"] == layer) & (strength["head"] == head)].sort_values("distance")
            for b, mass in zip(rows["distance"], rows["mass"]):
                want = (p[:, head] * (dist.round() == b)).sum(-1).mean()
                assert abs(mass - float(want)) < 1e-5
            np.testing.assert_allclose(rows["mass"].sum(), 1.0, atol=1e-5)
            zero, z = _ablated_logits(classifier, inputs, layer, head)
            mean, _ = _ablated_logits(classifier, inputs, layer, head, value=z.mean((0, 1)))
            row = heads[heads["head"] == head].iloc[0]
            for logits, mode in ((zero, "zero"), (mean, "mean")):
                acc = float((logits.argmax(-1) == labels).float().mean())
                loss = float(F.cross_entropy(logits, labels)) - float(F.cross_entropy(out.logits, labels))
                assert row[f"accuracy_drop_{mode}"] == pytest.approx(100 * (1 - acc), abs=1e-4)
                assert row[f"loss_rise_{mode}"] == pytest.approx(loss, abs=1e-4)
    curve = result.tables["pruning"]
    assert set(curve["k"]) == set(range(9)) and (curve[curve["k"] == 0]["accuracy"] == 100).all()


@pytest.mark.slow
def test_organism_vit_important_heads_matter_more(tmp_path):
    """organism-vit (trained here, 99.8 % held out): pruning the heads ranked most important costs far more
    accuracy than pruning as many heads ranked least important."""
    model = interp.load_model("organism-vit")
    result = interp.score(model, "vit", samples=1, batch=128, store=tmp_path)
    curve = result.tables["pruning"].pivot(index="k", columns="order", values="accuracy")
    assert curve.loc[0, "most"] >= 95
    for k in range(1, 5):
        assert curve.loc[k, "most"] < curve.loc[k, "least"] - 20, curve
    assert curve.loc[16, "most"] == curve.loc[16, "least"]  # every head pruned either way
    top = result.top("accuracy_drop_zero", k=1)
    assert top["accuracy_drop_zero"].iloc[0] > 20
    assert result.heads["distance"].between(0, 4.25).all()  # the largest distance on a 4 × 4 grid is 4.24


@pytest.mark.parametrize("name", ["vit", "deit", "clip", "siglip", "dinov2", "dinov2_reg"])
def test_vit_analysis_runs_on_every_vit_family(name):
    """Backbones without a classifier get distances and strength only; their distances are the taxonomy's."""
    from tiny_models import make

    hf, _ = make(name, attn="sdpa")
    model = interp.load_model(hf, processor=vit_processor())
    vit = interp.score(model, "vit", samples=1, batch=3)
    assert vit.scores == ["distance", "distance_px"] and "pruning" not in vit.tables
    taxonomy = interp.score(model, "taxonomy", samples=3)
    np.testing.assert_allclose(vit.heads["distance"], taxonomy.heads["distance"], rtol=1e-5)
    assert set(vit.tables["strength"]["layer"]) == set(range(model.n_layers()))
