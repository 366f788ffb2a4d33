"""Model loading, family detection, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch
import transformers as T

import interp
from interp.hooks import Recorder, capture
from interp.models import ModelLoadError


def test_aliases_and_model_objects_load():
    m = interp.load_model("stories260k")
    assert (m.family.name, m.head_counts(), m.n_layers(), m.max_tokens) == ("llama", (8, 4), 5, 512)
    assert m.config._attn_implementation == "sdpa" and not m.hf.training
    again = interp.load_model(m.hf, tokenizer=m.tokenizer)
    assert again.hf is m.hf and again.family is m.family
    assert interp.load_model("stories260k", dtype="float16").hf.dtype == torch.float16
    minilm = interp.load_model("minilm-l6")
    assert (minilm.family.name, minilm.head_counts(), minilm.n_layers()) == ("bert", (12, 12), 6)


@pytest.mark.slow
def test_smollm2_is_dequantised_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_CACHE", str(tmp_path))
    m = interp.load_model("smollm2-135m")
    assert (tmp_path / "models" / "smollm2-135m-instruct" / "config.json").exists()
    assert (m.head_counts(), m.n_layers(), m.config.rope_parameters["rope_theta"]) == ((9, 3), 30, 100000.0)
    ids = m.prepare("The capital of France is")
    out = m.hf.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in m.tokenizer.decode(out[0])


def test_unknown_alias_or_folder_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="built-in alias"):
        interp.load_model("no-such-model")
    with pytest.raises(ModelLoadError, match="no model folder"):
        interp.load_model("/nonexistent/model/dir")
    with pytest.raises(TypeError):
        interp.load_model(42)


def test_unsupported_family_says_what_was_tried(tmp_path):
    T.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(interp.UnsupportedFamilyError, match="'t5' is an encoder-decoder model.*llama.*qwen2_vl"):
        interp.load_model(str(tmp_path))  # refused from the config, before any weights are read
    with pytest.raises(interp.UnsupportedFamilyError, match="attention interface.*hand tables"):
        interp.load_model(T.T5Model(T.T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=50)))
    mamba = T.MambaForCausalLM(T.MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, state_size=4))
    with pytest.raises(interp.UnsupportedFamilyError, match="'mamba'.*no hand table \\(bert.*qwen2_vl.*\\) and none "
                                                              "of its modules calls transformers' attention interface"):
        interp.load_model(mamba)


def test_layers_heads_and_length_out_of_range():
    m = interp.load_model("stories260k")
    with pytest.raises(ValueError, match=r"layers \[7\] out of range.*5 text layers"):
        with capture(m, Recorder(), layers=[7]):
            pass
    with pytest.raises(ValueError, match=r"heads \[8\] out of range.*8 heads"):
        with capture(m, Recorder(), heads=[0, 8]):
            pass
    with pytest.raises(ValueError, match="unknown tensors"):
        with capture(m, Recorder(), keep=("q", "attn")):
            pass
    long = torch.randint(3, 500, (1, 600))
    with pytest.raises(ValueError, match="600 tokens is longer than the model's context of 512"):
        with torch.no_grad(), capture(m, Recorder()):
            m.hf(input_ids=long)
    with pytest.raises(ValueError, match="longer than the model's context"):
        m.prepare("Once upon a time " * 200)


def test_head_subset_is_captured_with_its_kv_heads():
    m = interp.load_model("stories260k")
    rec = Recorder()
    with torch.no_grad(), capture(m, rec, heads=[1, 6], layers=[2], keep=("q", "k", "z")):
        m.hf(**m.prepare("Once upon a time"))
    call = rec.get(layer=2)
    assert call.heads.tolist() == [1, 6] and call.kv_heads.tolist() == [0, 3]
    assert call.q.shape[1] == 2 and call.z.shape[2] == 2 and call.k.shape[1] == 4


def test_lvlm_and_vit_need_images_and_a_processor():
    from tiny_models import make

    llava = interp.load_model(make("llava")[0])
    with pytest.raises(ValueError, match="has no processor"):
        llava.prepare("What colour is the square?")
    vit = interp.load_model(make("vit")[0])
    with pytest.raises(ValueError, match="has no processor"):
        vit.prepare(images=None)
    with pytest.raises(ValueError, match="needs pixel_values"):
        interp.token_layout(llava, {"input_ids": torch.ones(1, 4, dtype=torch.long)}, tower="vision")


def test_cli_lists_aliases_and_families():
    out = subprocess.run([sys.executable, "-m", "interp.cli", "models", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    listing = json.loads(out.stdout)
    assert {a["name"] for a in listing["aliases"]} == {"stories260k", "smollm2-135m", "minilm-l6", "organism-vit",
                                                      "organism-llava"}
    types = {t for f in listing["families"] for t in f["model_types"]}
    assert {"gpt2", "llama", "mistral", "qwen2", "gemma2", "gemma3", "gpt_neox", "bert", "vit", "deit", "clip",
            "siglip", "dinov2", "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"} <= types
    assert "attention interface" in listing["discovered"]  # any other model is adapted from itself
    text = subprocess.run([sys.executable, "-m", "interp.cli", "models"], capture_output=True, text=True).stdout
    assert "Any other model" in text and "Refused with the reason" in text
    bad = subprocess.run([sys.executable, "-m", "interp.cli", "nonsense"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_static_cache_and_empty_layers_are_refused():
    m = interp.load_model("stories260k")
    with pytest.raises(ValueError, match="layers \\[\\] out of range"):
        with capture(m, Recorder(), layers=[]):
            pass
    ids = m.prepare(["Once upon a time", "Lily"])  # a batch: padding comes from the tokenizer's stand-in
    with pytest.raises(ValueError, match="dynamic KV cache"):
        with torch.no_grad(), capture(m, Recorder()):
            m.hf.generate(**ids, max_new_tokens=2, cache_implementation="static", do_sample=False)
    rec = Recorder()
    with torch.no_grad(), capture(m, rec, keep=("q",)):
        m.hf(**ids)
    with pytest.raises(ValueError, match="kept no keys"):
        rec.calls[0].kv_heads


def test_remote_code_runs_only_when_asked_and_nothing_is_asked_on_stdin(tmp_path):
    """A folder shipping its own modeling code: `echo y | interp score FOLDER` must neither ask nor run it."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "planted_remote", "architectures": ["PlantedModel"],
        "auto_map": {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"}}))
    marker = tmp_path / "ran"
    (folder / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                       "from transformers import PretrainedConfig\n"
                                       "class PlantedConfig(PretrainedConfig):\n    model_type = 'planted_remote'\n")
    run = lambda *flags: subprocess.run([sys.executable, "-m", "interp.cli", "score", str(folder), "--json", *flags],  # noqa: E731
                                        input="y\n", capture_output=True, text=True, timeout=120)
    out = run()
    assert out.returncode != 0 and not marker.exists()
    assert "ships its own modeling code" in out.stderr and "--trust-remote-code" in out.stderr
    assert out.stdout == ""  # no question on stdout, and nothing read from stdin
    run("--trust-remote-code")
    assert marker.exists()  # asked for explicitly: the checkpoint's code runs


def test_a_failed_dequantisation_leaves_no_temporary_folder(tmp_path, monkeypatch):
    """The disk fills up while the de-quantised SmolLM2 is written to the cache: the error surfaces and nothing
    half-written stays behind (stand-ins for the GGUF loading keep this fast)."""
    import transformers

    from interp import models

    monkeypatch.setenv("INTERP_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_package_dir", lambda package, alias: tmp_path)
    stub = interp.load_model("stories260k")

    def full_disk(*args, **kwargs):
        raise RuntimeError("safetensors: No space left on device")

    monkeypatch.setattr(stub.hf, "save_pretrained", full_disk)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: stub.hf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: stub.tokenizer)
    with pytest.raises(RuntimeError, match="No space left"):
        models.alias_path("smollm2-135m")
    assert list((tmp_path / "models").iterdir()) == []


def _llama_config(**sizes) -> T.LlamaConfig:
    return T.LlamaConfig(**{**dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1), **sizes})


def test_a_config_that_cannot_fit_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    """A local config of a million layers (or a vocabulary no memory holds) is refused from its sizes, with the
    numbers, before any module is built; the estimate is a lower bound of the real parameter counts."""
    built = []
    monkeypatch.setattr(T.LlamaForCausalLM, "__init__", lambda *a, **k: built.append(1) or 1 / 0)
    for sizes in (dict(num_hidden_layers=1_000_000, hidden_size=2048, intermediate_size=8192), dict(vocab_size=10**12)):
        folder = tmp_path / str(len(built)) / "huge"
        _llama_config(**sizes).save_pretrained(folder)
        with pytest.raises(ModelLoadError, match=r"at least [\d.e+]+ B parameters, [\d.]+ GiB in float32, but cpu has "
                                                 r"[\d.]+ GiB available; nothing was built"):
            interp.load_model(str(folder))
    assert not built
    monkeypatch.undo()
    from interp.models import estimated_parameters

    for name in ("stories260k", "smollm2-135m", "organism-llava", "minilm-l6"):
        model = interp.load_model(name)
        assert 0 < estimated_parameters(model.hf.config) <= sum(p.numel() for p in model.hf.parameters()), name


@pytest.mark.parametrize("field, value", [("num_attention_heads", 0), ("num_hidden_layers", -1), ("hidden_size", 2.5),
                                          ("num_key_value_heads", True)])
def test_a_config_with_impossible_sizes_names_the_field(tmp_path, field, value):
    folder = tmp_path / "bad"
    _llama_config().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=f"config.{field} is {value!r}: it must be a positive integer"):
        interp.load_model(str(folder))


def test_architectures_naming_something_else_than_a_model_class_fall_back_to_the_auto_class(tmp_path):
    folder = tmp_path / "tiny"
    torch.manual_seed(0)
    T.LlamaForCausalLM(_llama_config()).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["pipeline"]  # a transformers function, not a model class
    (folder / "config.json").write_text(json.dumps(config))
    model = interp.load_model(str(folder))
    assert type(model.hf).__name__ == "LlamaForCausalLM"
