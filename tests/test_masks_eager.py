"""Every mask form real models use (issue 29), checked against the model's own eager attention.

For each form (`tiny_masks`: Gemma 3's bidirectional images inside causal text, PaliGemma's prefix-LM, Pixtral's
block-diagonal images, ModernBERT's symmetric local windows, SigLIP2's padded patches, Llama 4's chunks, packed
documents) and the controls (Llama with left padding, Gemma 2 with a sliding window and soft-capping, BERT with
padding, ViT): on every captured layer of every tower, the probabilities rebuilt from the captured q/k
(`call_attention`) equal those the eager copy of the same weights computes (fp32, ≤ 1e-5, on the rows of real
tokens), and capture leaves the model's outputs bit-identical. Then each form runs an analysis end to end, and each
LVLM's token layout marks exactly the positions where the model writes image features (found from the model: the
language model's inputs_embeds that change when the images change, not from the image token id).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import interp
from auto_tiny import word_tokenizer
from interp.hooks import Recorder, capture
from interp.kernels import call_attention, call_stats
from test_families import eager_weights
from tiny_masks import CONTROLS, FORMS, LVLMS, FixedProcessor, make, packed_positions

TOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def _real_rows(inputs: dict, tower: str, batch: int, n_q: int) -> torch.Tensor | None:
    """(B, Nq) bool: the queries of real tokens (padding rows are free to differ), None: all."""
    mask = inputs.get("attention_mask") if tower == "text" else inputs.get("pixel_attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2 or tuple(mask.shape) != (batch, n_q):
        return None
    return mask.bool()


def _output(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def _check_against_eager(form: str) -> dict[str, list[int]]:
    """The check of the module docstring for one form; returns {tower: layers checked}."""
    fast_hf, inputs = make(form, "sdpa")
    eager_hf, _ = make(form, "eager")
    fast, eager = interp.load_model(fast_hf), interp.load_model(eager_hf)
    with torch.no_grad():
        plain = _output(fast.hf(**inputs))
    checked = {}
    towers = [t.name for t in fast.family.towers]
    assert towers
    for tower in towers:
        rec = Recorder()
        with torch.no_grad(), capture(fast, rec, tower=tower, keep=("q", "k", "v", "z")):
            out = _output(fast.hf(**inputs))
        assert torch.equal(plain, out), f"{form}: capture changed the model's outputs ({tower} tower)"
        weights = eager_weights(eager, inputs, tower)
        layers = fast.layers(tower)
        assert layers and {c.layer for c in rec.calls} == set(layers), f"{form} {tower}: layers captured"
        for layer in layers:
            calls = [c for c in rec.calls if c.layer == layer]
            refs = weights.get(layer, [])
            assert len(calls) == len(refs), f"{form} {tower} layer {layer}: {len(calls)} calls, eager {len(refs)}"
            for call, ref in zip(calls, refs):
                p = call_attention(call)
                assert p.shape == ref.shape, f"{form} {tower} layer {layer}: {tuple(p.shape)} vs {tuple(ref.shape)}"
                diff = (p - ref.float()).abs()
                real = _real_rows(inputs, tower, p.shape[0], p.shape[2])
                if real is not None:
                    diff = diff[real[:, None, :, None].expand_as(diff)]
                worst = float(diff.max())
                assert worst < TOL, f"{form} {tower} layer {layer}: max |Δp| {worst:.2e}"
        checked[tower] = layers
    return checked


# ----------------------------------------------------------------------------- capture against eager
@pytest.mark.parametrize("form", FORMS + CONTROLS)
def test_capture_matches_eager_on_every_layer_of_every_tower(form):
    checked = _check_against_eager(form)
    if form in LVLMS:
        assert set(checked) == {"text", "vision"}


def test_the_forms_are_what_they_claim():
    """The masks these inputs give are the forms named (the check above would pass vacuously on causal masks)."""
    from transformers import masking_utils

    # Gemma 3: an image token sees the later tokens of its own image (not of the next one)
    hf, inputs = make("gemma3_images", "eager")
    ids = inputs["input_ids"]
    eager = interp.load_model(hf)
    full = eager_weights(eager, inputs, "text")[1][0]  # layer 1: full attention
    img = (ids[0] == 127).nonzero()[:, 0]
    assert float(full[0, :, img[0], img[3]].min()) > 0 and float(full[0, :, img[3], img[4]].max()) == 0
    # PaliGemma: the prefix sees the whole prefix, the answer is causal
    hf, inputs = make("paligemma", "eager")
    w = eager_weights(interp.load_model(hf), inputs, "text")[0][0]
    last_prefix = int((inputs["token_type_ids"][0] == 0).nonzero()[-1])
    assert float(w[0, :, 0, last_prefix].min()) > 0 and float(w[0, :, last_prefix, last_prefix + 1].max()) == 0
    # Pixtral: the vision tower's keys of one image are invisible to the other's queries
    hf, inputs = make("mistral3", "eager")
    w = eager_weights(interp.load_model(hf), inputs, "vision")[0][0]
    assert w.shape[-1] == 16 + 24 and float(w[0, :, :16, 16:].abs().max()) == 0 and float(w[0, :, 16:, :16].abs().max()) == 0
    # ModernBERT: the local layers see |i − j| ≤ 2
    hf, inputs = make("modernbert", "eager")
    w = eager_weights(interp.load_model(hf), inputs, "text")[1][0][0, 0]
    assert float(w[5, 3]) > 0 and float(w[5, 7]) > 0 and float(w[5, 2]) == 0 and float(w[5, 8]) == 0
    # Llama 4: chunks of 5 from the first real token
    hf, inputs = make("llama4_chunked", "eager")
    w = eager_weights(interp.load_model(hf), inputs, "text")[0][0]
    assert float(w[0, :, 5, 4].max()) == 0 and float(w[0, :, 4, 0].min()) > 0
    assert float(w[1, :, 8, 7].max()) == 0 and float(w[1, :, 7, 3].min()) > 0  # row 1: 3 padding tokens
    # packing: transformers finds the documents from the restarting positions
    hf, inputs = make("llama_packed", "eager")
    assert masking_utils.find_packed_sequence_indices(packed_positions()) is not None
    w = eager_weights(interp.load_model(hf), inputs, "text")[0][0]
    assert float(w[0, :, 4, :4].abs().max()) == 0 and float(w[0, :, 3, 0].min()) > 0


def test_paligemma_without_token_types_follows_its_own_sdpa_call():
    """PaliGemma's text config sets use_bidirectional_attention (its attention modules are not causal): without
    token_type_ids and padding, create_causal_mask returns no mask and SDPA attends bidirectionally (eager, given a
    causal mask, differs). Capture follows the model's own call: its probabilities times v are the layer's output."""
    hf, inputs = make("paligemma", "sdpa")
    one = {k: v[:1] for k, v in inputs.items() if k != "token_type_ids"}
    model = interp.load_model(hf)
    rec = Recorder()
    with torch.no_grad(), capture(model, rec, tower="text", keep=("q", "k", "v", "z")):
        model.hf(**one)
    for call in rec.calls:
        p = call_attention(call)
        v = call.v.repeat_interleave(call.n_heads // call.v.shape[1], dim=1).float()
        assert float((p @ v - call.z.transpose(1, 2).float()).abs().max()) < TOL, f"layer {call.layer}"


# ----------------------------------------------------------------------------- analyses end to end
def _one_sample(form: str, inputs: dict) -> dict:
    """One sample of a form's inputs, as its processor would return for one image-text pair (the padded one where
    padding is the point)."""
    if form == "gemma3_images":
        return {k: v[:2] if k == "pixel_values" else v[:1] for k, v in inputs.items()}
    if form == "paligemma":
        return {k: v[1:2] for k, v in inputs.items()}
    if form == "siglip2":
        return {k: v[1:2] for k, v in inputs.items()}
    return dict(inputs)


def _scored_model(form: str) -> interp.Model:
    hf, inputs = make(form, "sdpa")
    tok = word_tokenizer()
    kind = interp.load_model(hf).family.kind
    if kind in ("lvlm", "vit"):
        return interp.load_model(hf, tokenizer=tok, processor=FixedProcessor(_one_sample(form, inputs), tok))
    hf.config.bos_token_id, hf.config.eos_token_id = 1, 2
    return interp.load_model(hf, tokenizer=tok)


def _check_heads(model: interp.Model, result, what: str) -> None:
    heads = result.heads
    tower = model.family.primary.name if hasattr(model.family, "primary") else None
    n_heads, _ = model.head_counts()
    assert sorted(set(zip(heads["layer"], heads["head"]))) == [(lay, h) for lay in model.layers(tower)
                                                               for h in range(n_heads)], what
    scores = heads.drop(columns=["layer", "head", "kv_head"], errors="ignore").select_dtypes("number")
    assert len(scores.columns) and bool(np.isfinite(scores.to_numpy()).all()), what


SINKS = {"gemma3_images": dict(samples=1), "paligemma": dict(samples=1), "mistral3": dict(samples=1),
         "siglip2": dict(samples=2), "modernbert": dict(samples=1, max_tokens=24, inputs="natural"),
         "llama4_chunked": dict(samples=1, max_tokens=24, inputs="natural")}


@pytest.mark.parametrize("form", sorted(SINKS))
def test_sinks_runs_end_to_end(form):
    """The sinks analysis (the kernels' key mass / key count / segment mass under the form's mask) on the tiny model,
    from text and images through its processor: every head of every layer scored, every score finite."""
    model = _scored_model(form)
    result = interp.score(model, "sinks", **SINKS[form])
    _check_heads(model, result, f"{form} sinks")


@pytest.mark.parametrize("form, tower", [("llama_packed", "text"), ("llama_packed_4d", "text"),
                                         ("mistral3", "vision")])
def test_statistics_match_eager_where_no_analysis_reaches(form, tower):
    """No analysis packs documents itself, and the analyses score an LVLM's language model, not its vision tower: the
    statistics they read (`call_stats`: the attention each key receives, the queries that see it, each row's largest
    probability and log-sum-exp) equal the eager probabilities' own."""
    fast_hf, inputs = make(form, "sdpa")
    eager_hf, _ = make(form, "eager")
    fast, eager = interp.load_model(fast_hf), interp.load_model(eager_hf)
    rec = Recorder()
    with torch.no_grad(), capture(fast, rec, tower=tower, keep=("q", "k")):
        fast.hf(**inputs)
    weights = eager_weights(eager, inputs, tower)
    assert {c.layer for c in rec.calls} == set(fast.layers(tower))
    for call in rec.calls:
        ref = weights[call.layer][0].float()
        stats = call_stats(call, stats=("key_mass", "key_count", "max_prob", "lse"))
        where = f"{form} {tower} layer {call.layer}"
        assert torch.allclose(stats.key_mass, ref.sum(2), atol=1e-4), f"{where}: key mass"
        seen = (ref[:, 0] > 0).sum(1).float()  # (B, Nk): the mask is the same for every head
        assert torch.equal(stats.key_count.float().reshape(seen.shape), seen), f"{where}: key count"
        assert torch.allclose(stats.max_prob, ref.amax(-1), atol=1e-5), f"{where}: max prob"
        # lse − the logit of the row's most likely key = −log(its probability)
        logits = torch.einsum("bhqd,bhkd->bhqk", call.q.float(), call.head_keys().float().repeat_interleave(
            call.q.shape[1] // call.head_keys().shape[1], 1)) * call.scale
        top = logits.gather(-1, ref.argmax(-1, keepdim=True))[..., 0]
        assert torch.allclose(stats.lse - top, -ref.amax(-1).log(), atol=1e-4), f"{where}: lse"


# ----------------------------------------------------------------------------- image layout
def _image_positions(model: interp.Model, inputs: dict) -> torch.Tensor:
    """(B, N) bool: the positions of the language model's inputs_embeds that change when the images change."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else args[0]).detach().clone())

    lm = model.hf.model.language_model
    handle = lm.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.hf(**inputs)
            other = dict(inputs, pixel_values=torch.randn_like(inputs["pixel_values"]) * 3 + 1)
            model.hf(**other)
    finally:
        handle.remove()
    return (seen[0] != seen[1]).any(-1)


@pytest.mark.parametrize("form", LVLMS)
def test_layout_marks_where_the_model_writes_image_features(form):
    hf, inputs = make(form, "sdpa")
    model = interp.load_model(hf)
    written = _image_positions(model, inputs)
    assert bool(written.any())
    layout = interp.layout.token_layout(model, inputs)
    marked = layout.mask("image")
    assert torch.equal(marked, written), f"{form}: layout marks {marked.nonzero().tolist()}, " \
                                         f"the model writes {written.nonzero().tolist()}"
