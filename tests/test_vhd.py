"""The `vhd` analysis: head outputs with and without the image equal the model's own per-head outputs (read at
the output projection's input, independently of interp's capture), for both image-free constructions."""

import numpy as np
import pytest
import torch
from PIL import Image

import interp
from interp.analyses.images import load_image
from interp.analyses.sinks import lvlm_prompt
from tiny_models import llava_with_processor

PROMPT = "w5 w9 w11"


@pytest.fixture(scope="module")
def llava():
    hf, proc = llava_with_processor(n_layers=3)
    return interp.load_model(hf, processor=proc)


def _o_proj_inputs(model, inputs):
    """(L, N, H·d) inputs of every text layer's o_proj, by forward pre-hooks."""
    layers = model.hf.model.language_model.layers
    seen, handles = {}, []
    for i, layer in enumerate(layers):
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0][0].detach().clone())))
    try:
        with torch.no_grad():
            model.hf(**inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(layers))])


@pytest.mark.parametrize("construction", ["drop", "blank"])
def test_vhd_equals_the_models_own_head_outputs(llava, construction):
    result = interp.score(llava, "vhd", samples=2, prompt=PROMPT, max_new_tokens=4, no_image=construction)
    steps = result.tables["steps"]
    d = llava.config.text_config.hidden_size // llava.config.text_config.num_attention_heads
    for i, sample in enumerate(result.meta["plan"]):
        image = load_image(sample["image"])
        with_image = llava.prepare(lvlm_prompt(llava, PROMPT), images=[image])
        gen = interp.analyses.retrieval.greedy(llava, with_image, 4)
        if construction == "drop":
            without = llava.prepare(lvlm_prompt(llava, PROMPT, image=False), images=[])
            assert without["input_ids"].shape[1] < with_image["input_ids"].shape[1]  # the image tokens are gone
        else:
            without = llava.prepare(lvlm_prompt(llava, PROMPT), images=[Image.new("RGB", image.size)])
            assert without["input_ids"].shape == with_image["input_ids"].shape  # positions kept

        def forced(inputs):
            full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], gen[None, :-1]], -1))
            full["attention_mask"] = torch.ones_like(full["input_ids"])
            n = inputs["input_ids"].shape[1]
            return _o_proj_inputs(llava, full)[:, n - 1:n - 1 + len(gen)]              # (L, T, H·d)
        a, b = forced(with_image), forced(without)
        want = (a - b).unflatten(-1, (-1, d)).pow(2).sum(-1).sqrt()                     # (L, T, H)
        got = steps[steps["sample"] == i]
        assert len(got) == want.numel()
        for r in got.itertuples():
            assert r.vhd == pytest.approx(float(want[r.layer, r.step, r.head]), rel=1e-4, abs=1e-6)
    assert result.meta["params"]["no_image"] == construction
    np.testing.assert_allclose(result.heads["vhd"], steps.groupby(["layer", "head"])["vhd"].mean().to_numpy(),
                               rtol=1e-5)


def test_t_vhd_sums_each_layers_top_k(llava):
    result = interp.score(llava, "vhd", samples=1, prompt=PROMPT, max_new_tokens=3, topk=2, squared=True)
    steps, tvhd = result.tables["steps"], result.tables["tvhd"]
    for r in tvhd.itertuples():
        s = steps[(steps["sample"] == r.sample) & (steps["step"] == r.step)]
        want = sum(g.nlargest(2, "vhd")["vhd"].sum() for _, g in s.groupby("layer"))
        assert r.tvhd == pytest.approx(want, rel=1e-6)


def test_vhd_refuses_text_models_and_bad_settings(llava):
    with pytest.raises(ValueError, match="does not apply"):
        interp.score("stories260k", "vhd")
    with pytest.raises(ValueError, match="no_image"):
        interp.score(llava, "vhd", no_image="gray")
