"""The head atlas beyond decoders (issue 30): a ViT's, an encoder's and an LVLM's atlas end to end, the LVLM's
language heads checked against the same weights loaded as a plain LLM, and a planted circuit given its planted
role and nothing else above chance."""

import pandas as pd
import pytest
import torch
from transformers import LlamaForCausalLM

import interp
import planted_circuit
from interp.atlases import compare_atlases

SMALL = {"summary": {"samples": 2, "max_tokens": 32}, "sinks": {"samples": 2, "max_tokens": 32},
         "taxonomy": {"samples": 2, "max_tokens": 32}, "lookback": {"samples": 2, "max_tokens": 32},
         "retrieval": {"lengths": [100], "depths": [50], "n_needles": 1, "mask_k": [0], "max_new_tokens": 4},
         "circuits": {"samples": 1, "methods": "eap", "batch": 4},
         "vit": {"samples": 2, "batch": 4}, "vhd": {"samples": 2, "max_new_tokens": 4}}
TEXT = ("summary", "taxonomy", "lookback")


def _check_cards(atlas, store):
    """Every card's value is its run's heads-table value."""
    for analysis, run in atlas.runs.items():
        result = interp.open_run(run, store)
        for row in result.heads.to_dict("records"):
            card = atlas.card(int(row["layer"]), int(row["head"]))
            for score in result.scores:
                assert card["scores"][f"{analysis}.{score}"]["value"] == pytest.approx(row[score], nan_ok=True)


def test_a_vit_atlas(tmp_path):
    atlas = interp.atlas("organism-vit", SMALL, tmp_path)
    assert set(atlas.runs) == {"sinks", "taxonomy", "vit"}
    assert all("does not apply" in why for why in atlas.skipped.values())
    assert {"vit.global", "vit.local", "vit.important", "sinks.sink"} <= set(atlas.role_names)
    assert len(atlas.heads) == 16  # 4 layers × 4 heads of the ViT
    _check_cards(atlas, tmp_path)
    assert interp.open_atlas(atlas.id, tmp_path).runs == atlas.runs


def test_an_encoder_atlas(tmp_path):
    atlas = interp.atlas("minilm-l6", SMALL, tmp_path)
    assert set(atlas.runs) == {"summary", "sinks", "taxonomy", "lookback"}
    assert set(atlas.skipped) == {"retrieval", "circuits", "vit", "vhd"}
    assert len(atlas.heads) == 72
    _check_cards(atlas, tmp_path)


def _language_model(lvlm: interp.Model) -> interp.Model:
    """The LVLM's language model (its text config, embeddings, layers and head) loaded as a plain Llama LLM."""
    llm = LlamaForCausalLM(lvlm.hf.config.text_config).eval()
    weights = {}
    for name, value in lvlm.hf.state_dict().items():
        if name.startswith("model.language_model."):
            weights["model." + name.removeprefix("model.language_model.")] = value
        elif name.startswith("lm_head."):
            weights[name] = value
    missing, unexpected = llm.load_state_dict(weights, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return interp.load_model(llm, tokenizer=lvlm.processor.tokenizer)


@pytest.mark.slow
def test_an_lvlm_atlas_scores_its_language_heads_as_the_llm_they_came_from(tmp_path):
    lvlm = interp.load_model("organism-llava")
    atlas = interp.atlas(lvlm, SMALL, tmp_path)
    assert {"sinks", "vhd", *TEXT} <= set(atlas.runs)
    assert "vhd.vision_aware" in atlas.role_names and "taxonomy.induction" in atlas.role_names
    assert len(atlas.heads) == 16  # the language model's 4 layers × 4 heads
    for analysis in TEXT:
        plan = interp.open_run(atlas.runs[analysis], tmp_path).meta["plan"]
        assert plan and not any("image" in sample for sample in plan)  # text alone: the language model
    _check_cards(atlas, tmp_path)

    llm = _language_model(lvlm)
    text = interp.atlas(llm, SMALL, tmp_path / "llm", analyses=TEXT)
    for analysis in TEXT:  # the same heads, the same scores: text-only inputs run the language model alone
        a = interp.open_run(atlas.runs[analysis], tmp_path).heads
        b = interp.open_run(text.runs[analysis], tmp_path / "llm").heads
        pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-5, rtol=1e-4)
    table = compare_atlases(text, atlas).set_index("role")
    shared = [r for r in text.role_names]
    assert (table.loc[shared, "match"] == "layer-head").all()
    assert (table.loc[shared, "only_a"] == "").all() and (table.loc[shared, "only_b"] == "").all()
    assert table.loc["vhd.vision_aware", "match"] == "only in B"


def test_a_planted_circuit_gets_its_role_and_nothing_else_above_chance(tmp_path):
    task = tmp_path / "first.jsonl"
    planted_circuit.write_task(task)
    preset = {"circuits": {"tasks": [str(task)], "methods": "patching,eap", "circuit_percent": 25},
              "taxonomy": {"samples": 2}, "sinks": {"samples": 2}}
    atlas = interp.atlas(planted_circuit.model(), preset, tmp_path / "store",
                               analyses=["circuits", "taxonomy", "sinks"])
    role = "circuits.circuit_first"
    assert role in atlas.role_names
    members = atlas.roles.loc[atlas.roles[role], ["layer", "head"]]
    assert set(map(tuple, members.to_numpy().tolist())) == set(planted_circuit.CIRCUIT)
    card = atlas.card(*planted_circuit.RECEIVER)
    assert role in card["roles"] and card["scores"]["circuits.first_patching"]["rank"] <= 2
    for layer, head in zip(atlas.heads["layer"], atlas.heads["head"]):  # zero output projections: in no circuit
        if (layer, head) not in planted_circuit.CIRCUIT:
            assert role not in atlas.card(layer, head)["roles"]
    overlaps = atlas.overlaps()
    with_circuit = overlaps[(overlaps["role_a"] == role) | (overlaps["role_b"] == role)]
    assert (with_circuit["p_value"].isna() | (with_circuit["p_value"] >= 0.05)).all()
