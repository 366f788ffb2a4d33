"""The `vhd` analysis: head outputs with and without the image equal the model's own per-head outputs (read at
the output projection's input, independently of interp's capture), for both image-free constructions."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

import interp
from interp.analyses.images import load_image
from interp.analyses.inputs import lvlm_prompt
from tiny_models import llava_with_processor

PROMPT = "w5 w9 w11"


@pytest.fixture(scope="module")
def llava():
    hf, proc = llava_with_processor(n_layers=3)
    return interp.load_model(hf, processor=proc)


def _o_proj_inputs(model, inputs):
    """(L, N, H·d) inputs of every text layer's o_proj, by forward pre-hooks."""
    modules = model.attention_modules()
    seen, handles = {}, []
    for i, module in enumerate(modules):
        handles.append(module.o_proj.register_forward_pre_hook(
            lambda mod, args, i=i: seen.__setitem__(i, args[0][0].detach().clone())))
    try:
        with torch.no_grad():
            model.hf(**inputs)
    finally:
        for h in handles:
            h.remove()
    return torch.stack([seen[i] for i in range(len(modules))])


@pytest.mark.parametrize("construction", ["drop", "blank", "mean"])
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
            colour = (0, 0, 0) if construction == "blank" else tuple(
                round(255 * m) for m in llava.processor.image_processor.image_mean)
            without = llava.prepare(lvlm_prompt(llava, PROMPT), images=[Image.new("RGB", image.size, colour)])
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


def test_vhd_dashboard_view(llava, tmp_path):
    from interp.app.dashboard import Dashboard

    run = interp.score(llava, "vhd", samples=2, prompt=PROMPT, max_new_tokens=3, store=tmp_path)
    board = Dashboard(tmp_path)
    items = board.analysis_view(board.catalog.result(run.id))
    views = {g.figure.layout.title.text: g.figure for g in items if hasattr(g, "figure")}
    fig = views["T-VHD along the generated text, sample 1"]
    tvhd = run.tables["tvhd"]
    assert list(fig.data[0].y) == pytest.approx(list(tvhd[tvhd["sample"] == 1]["tvhd"]))
    assert "vhd per layer" in views and views["sample 1: the image"].data[0].type == "image"
    answer = "".join(tvhd[tvhd["sample"] == 1]["token"]).strip()
    assert f"sample 1: prompt “{PROMPT}” → answer “{answer}”" in str(items)  # the prompt and the answer, as text


def test_vhd_refuses_text_models_and_bad_settings(llava):
    with pytest.raises(ValueError, match="does not apply"):
        interp.score("stories260k", "vhd")
    with pytest.raises(ValueError, match="no_image"):
        interp.score(llava, "vhd", no_image="gray")


def _one_sample(name):
    """A single-sample (batch 1, no padding) input of the tiny `name` config, and the same text without the image."""
    import tiny_models as tm

    if name == "llava":
        hf, _ = tm.make("llava", attn="eager")
        ids, _ = tm._seq_with_image_tokens([16])
        inputs = {"input_ids": ids, "pixel_values": tm._pix(1, 3, 32, 32)}
    elif name == "llava_next":
        hf, full = tm.make("llava_next", attn="eager")
        ids, _ = tm._seq_with_image_tokens([tm.llava_next_num_image_tokens(30, 60)])
        inputs = {"input_ids": ids, "pixel_values": full["pixel_values"][:1, :3], "image_sizes": full["image_sizes"][:1]}
    else:
        hf, _ = tm.make("qwen2_vl", attn="eager")
        inputs = tm._qwen_vl_inputs(hf.config, [[1, 4, 4]])
        inputs.pop("attention_mask")
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    text = inputs["input_ids"][inputs["input_ids"] != tm.IMG_TOK][None]
    without = {"input_ids": text, "attention_mask": torch.ones_like(text)}
    if name == "qwen2_vl":
        without["mm_token_type_ids"] = torch.zeros_like(text, dtype=torch.int)
    return interp.load_model(hf), inputs, without


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_vl"])
def test_head_outputs_with_and_without_the_image_equal_the_models_own(name):
    """For each LVLM family, the captured head outputs at the answer positions equal the per-head slices of the
    output projection's input, with the image and with its tokens dropped (positions and RoPE shift)."""
    from interp.analyses.vhd import head_outputs

    model, with_image, without = _one_sample(name)
    answer = torch.tensor([5, 17, 9])
    opts = interp.analyses.Options()
    d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    for inputs in (with_image, without):
        got = head_outputs(model, inputs, answer, opts)                                   # (L, H, T, d)
        full = dict(inputs, input_ids=torch.cat([inputs["input_ids"], answer[None, :-1]], -1))
        full["attention_mask"] = torch.ones_like(full["input_ids"])
        if "mm_token_type_ids" in full:
            full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"],
                                                   torch.zeros(1, len(answer) - 1, dtype=torch.int)], -1)
        n = inputs["input_ids"].shape[1]
        want = _o_proj_inputs(model, full)[:, n - 1:n - 1 + len(answer)].unflatten(-1, (-1, d)).transpose(1, 2)
        assert torch.allclose(got, want, atol=1e-5), name


@contextmanager
def _scaled_at_o_proj(model, chosen: dict[int, list[int]], alpha: float):
    """Scale the chosen heads' slices of each layer's o_proj input by alpha (pre-hooks, independent of interp)."""
    d = model.config.text_config.hidden_size // model.config.text_config.num_attention_heads
    handles = []
    for layer, heads in chosen.items():
        def scale(mod, args, heads=heads):
            x = args[0].clone()
            for h in heads:
                x[..., h * d:(h + 1) * d] *= alpha
            return (x,)
        handles.append(model.attention_modules()[layer].o_proj.register_forward_pre_hook(scale))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _choice_by_definition(vhd: list[float], energy: list[float]) -> list[int]:
    """VHR's choice in plain Python: the outlier rule (population μ + σ), then the heads above the median."""
    def mu_sigma(x):
        mu = sum(x) / len(x)
        return mu, (sum((v - mu) ** 2 for v in x) / len(x)) ** 0.5
    (mv, sv), (me, se) = mu_sigma(vhd), mu_sigma(energy)
    v = [0.0 if a > mv + sv and e > me + se else a for a, e in zip(vhd, energy)]
    s = sorted(v)
    median = (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2
    return [h for h, a in enumerate(v) if a > median]


def test_vhr_outlier_rule_on_planted_values():
    from interp.analyses.vhd import vhr_choice

    vhd = [1.0, 2.0, 3.0, 4.0, 5.0, 30.0]       # head 5: far above μ + σ …
    energy = [1.0, 1.0, 1.0, 1.0, 1.0, 50.0]    # … and so is its image-free energy: an outlier, set to 0
    assert vhr_choice(torch.tensor(vhd), torch.tensor(energy)) == [2, 3, 4] == _choice_by_definition(vhd, energy)
    calm = [1.0] * 6                            # the same VHD with ordinary energy: kept, and chosen
    assert vhr_choice(torch.tensor(vhd), torch.tensor(calm)) == [3, 4, 5] == _choice_by_definition(vhd, calm)


def test_vhr_chooses_heads_above_the_median_and_reinforces_them(llava):
    """VHR: alpha = 1 changes nothing; the first layer's heads are those above its median VHD at the prompt's last
    position; generation with the chosen heads scaled equals scaling them by hand at the output projection."""
    from interp.analyses.vhd import head_outputs, vhr_generate, vhr_heads
    from interp.analyses.inputs import greedy

    image = load_image(3)
    with_image = llava.prepare(lvlm_prompt(llava, PROMPT), images=[image])
    without = llava.prepare(lvlm_prompt(llava, PROMPT, image=False), images=[])
    plain = greedy(llava, with_image, 5)
    same, _ = vhr_generate(llava, PROMPT, image, alpha=1.0, max_new_tokens=5)
    assert torch.equal(same, plain)

    chosen = vhr_heads(llava, with_image, without, layers=[-1, 0, 1], alpha=2.0)  # -1: the last layer
    assert sorted(chosen) == [0, 1, 2]
    opts = interp.analyses.Options()
    for layer in range(3):  # by hand: the lower layers' chosen heads scaled at o_proj, then the layer's VHD
        with _scaled_at_o_proj(llava, {lower: chosen[lower] for lower in range(layer)}, 2.0):
            z_img = head_outputs(llava, with_image, torch.tensor([7]), opts)[layer, :, 0]  # (H, d)
            z_no = head_outputs(llava, without, torch.tensor([7]), opts)[layer, :, 0]
        vhd = (z_img - z_no).norm(dim=-1).tolist()
        energy = z_no.pow(2).sum(-1).tolist()
        assert chosen[layer] == _choice_by_definition(vhd, energy), layer

    tokens, chosen = vhr_generate(llava, PROMPT, image, alpha=3.0, layers=[0, 1, 2], max_new_tokens=5)
    with _scaled_at_o_proj(llava, chosen, 3.0):
        by_hand = greedy(llava, with_image, 5)
    assert torch.equal(tokens, by_hand)
    from interp.hooks import mask_heads
    with torch.no_grad():
        base = llava.hf(**with_image).logits
        with mask_heads(llava, [(lay, h) for lay, hs in chosen.items() for h in hs], mode="scale", factor=3.0):
            reinforced = llava.hf(**with_image).logits
    assert not torch.allclose(base, reinforced, atol=1e-3)  # the reinforcement does change the model
    with pytest.raises(ValueError, match="vision-language"):
        vhr_generate(interp.load_model("stories260k"), PROMPT, image)


@pytest.mark.slow
def test_organism_llava_top_vhd_heads_carry_the_image():
    """organism-llava: ablating the 4 highest-VHD heads costs image questions far more than random heads do; VHR at
    alpha 1.5 keeps the accuracy and makes the answers depend more on the image (benchmarks/vhd_organism.py)."""
    import random

    from interp.analyses import vhd_organism as exp
    from interp.hooks import mask_heads
    from interp.organisms import llava as org

    model = interp.load_model("organism-llava")
    image_q = [q for q in org.test_set(120) if q["scene"] is not None]
    vhd = exp.vhd_per_head(model, image_q)
    top = [divmod(int(i), vhd.shape[1]) for i in vhd.flatten().topk(4).indices]
    rest = [(lay, h) for lay in range(vhd.shape[0]) for h in range(vhd.shape[1]) if (lay, h) not in top]
    with mask_heads(model, top, mode="zero"):
        top_acc = exp.accuracy(model, image_q)
    rng = random.Random(0)
    random_acc = []
    for _ in range(3):
        with mask_heads(model, rng.sample(rest, 4), mode="zero"):
            random_acc.append(exp.accuracy(model, image_q))
    assert top_acc < np.mean(random_acc) - 0.2, (top_acc, random_acc)
    effect = exp.vhr_effect(model, image_q[:40], alpha=1.5)
    assert effect["vhr"]["accuracy"] >= effect["plain"]["accuracy"] - 0.03
    assert effect["vhr"]["tv_real_vs_blank"] > effect["plain"]["tv_real_vs_blank"]


def test_vhd_bad_images(llava, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        interp.score(llava, "vhd", images=str(tmp_path / "empty"))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read the image"):
        interp.score(llava, "vhd", images=str(tmp_path / "broken.png"), prompt=PROMPT)


def test_cli_generate_with_vhr(tmp_path, capsys):
    import json

    from interp.cli import main
    from interp.organisms import llava as org

    q = next(x for x in org.test_set(50) if x["kind"] == "colour")
    org.image_of(q["scene"]).save(tmp_path / "q.png")
    question = q["text"].removeprefix("<image> ")
    assert main(["generate", "organism-llava", "--image", str(tmp_path / "q.png"), "--prompt", question,
                 "--max-new-tokens", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["text"] == q["answer"] and plain["reinforced_heads"] is None
    assert main(["generate", "organism-llava", "--image", str(tmp_path / "q.png"), "--prompt", question,
                 "--max-new-tokens", "2", "--vhr", "1.5", "--json"]) == 0
    vhr = json.loads(capsys.readouterr().out)
    assert vhr["vhr_alpha"] == 1.5 and len(vhr["reinforced_heads"]) > 0
    assert main(["generate", "stories260k", "--prompt", "x", "--image", str(tmp_path / "q.png")]) == 1
    assert "not a vision-language model" in capsys.readouterr().err
    for name in ("minilm-l6", "organism-vit"):  # no text to generate: one clear message, not a circle or a traceback
        for image in ([], ["--image", str(tmp_path / "q.png")]):
            assert main(["generate", name, "--prompt", "x", *image]) == 1
            assert "does not generate text" in capsys.readouterr().err
    assert main(["generate", "organism-llava", "--prompt", "x"]) == 1
    assert "is a vision-language model: give --image" in capsys.readouterr().err
    assert main(["generate", "organism-llava", "--prompt", "x", "--vhr", "2"]) == 2
    assert main(["generate", "organism-llava", "--prompt", "x", "--image", str(tmp_path / "q.png"), "--vhr", "0"]) == 2
