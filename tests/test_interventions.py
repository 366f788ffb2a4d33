"""The intervention pipeline: stages in their documented order, one intervention of a kind per module, nothing
left behind."""

import pytest
import torch
from transformers.modeling_utils import AttentionInterface

import interp
from interp.hooks import Recorder, capture, mask_heads
from interp.hooks.interventions import SLOT


@pytest.fixture(scope="module")
def model():
    return interp.load_model("stories260k")


def test_capture_observes_the_output_after_knock_outs(model):
    inputs = model.prepare("Once upon a time there was a cat.")
    rec = Recorder()
    with torch.no_grad(), mask_heads(model, [(1, 2), (1, 5)], mode="zero"), capture(model, rec, layers=[1],
                                                                                     keep=("q", "k", "z")):
        model.hf(**inputs)
    z = rec.get(layer=1).z                                   # (B, N, H, d)
    assert torch.equal(z[:, :, [2, 5]], torch.zeros_like(z[:, :, [2, 5]]))
    assert z[:, :, [0, 1, 3, 4, 6, 7]].abs().sum() > 0
    rec = Recorder()
    with torch.no_grad(), mask_heads(model, [(1, 2)], mode="uniform"), capture(model, rec, layers=[1]):
        model.hf(**inputs)
    q = rec.get(layer=1).q                                   # stage 1 ran before the capture saw the query
    assert torch.equal(q[:, 2], torch.zeros_like(q[:, 2])) and q[:, 3].abs().sum() > 0


def test_one_of_a_kind_per_module_and_nothing_left_behind(model):
    before = dict(AttentionInterface._global_mapping)
    modules = model.attention_modules()
    with mask_heads(model, [(0, 1)], mode="zero"), capture(model, lambda call: None, layers=[0]):
        assert [type(iv).__name__ for iv in modules[0].__dict__[SLOT]] == ["_Knockout", "Site"]
        with pytest.raises(RuntimeError, match="layer 0 already has heads knocked out"):
            with mask_heads(model, [(0, 2)], mode="zero"):
                pass
        with pytest.raises(RuntimeError, match="layer 0 already has a capture"):
            with capture(model, lambda call: None, layers=[0]):
                pass
        assert [type(iv).__name__ for iv in modules[0].__dict__[SLOT]] == ["_Knockout", "Site"]
    assert all(SLOT not in m.__dict__ for m in modules)
    assert dict(AttentionInterface._global_mapping) == before
