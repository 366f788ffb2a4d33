"""Family adapters: one small declarative table per model family.

A family says where the attention modules are (per tower: the text decoder, the vision encoder), whether
attention is causal, which config attribute bounds the input length, and which tokens are special.
Everything else (head counts, scaling, sliding windows, soft-capping, positions) is read at run time from
what the model passes to its own attention function, so adding a family is adding a `Family(...)` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn


class UnsupportedFamilyError(ValueError):
    """The model's `config.model_type` has no adapter."""


@dataclass(frozen=True)
class Tower:
    """A stack of attention layers inside a model.

    name: "text" or "vision". layers: candidate dotted paths, from the loaded top module, to the ModuleList
    of blocks (the first that exists is used, so `LlamaModel` and `LlamaForCausalLM` both work).
    attention: candidate dotted paths from a block to the module whose forward calls the attention function.
    causal: whether its attention is causal.
    """

    name: str
    layers: tuple[str, ...]
    attention: tuple[str, ...]
    causal: bool


@dataclass(frozen=True)
class Family:
    """Declarative adapter for one model family.

    kind: "llm" | "encoder" | "vit" | "lvlm". context: config attribute (on the text config) giving the
    longest input in tokens, or None when unbounded by the family. prefix: names of the special tokens that
    precede the patches of a ViT image (CLS, distillation); registers: config attribute giving how many
    register tokens follow them. image_layout: how an LVLM lays image tokens out ("llava": square grids, and
    LLaVA-NeXT's base + unpadded tile grids; "merged": Qwen-VL's m×m merged patches).
    """

    name: str
    model_types: tuple[str, ...]
    kind: str
    towers: tuple[Tower, ...]
    context: str | None = "max_position_embeddings"
    prefix: tuple[str, ...] = ()
    registers: str | None = None
    image_layout: str | None = None
    notes: str = field(default="", compare=False)

    @property
    def primary(self) -> Tower:
        """The tower analyses use unless told otherwise: the text decoder of an LVLM, else the only one."""
        return self.towers[0]

    def tower(self, name: str | None) -> Tower:
        if name is None:
            return self.primary
        for t in self.towers:
            if t.name == name:
                return t
        raise ValueError(f"family {self.name!r} has no tower {name!r}; it has {[t.name for t in self.towers]}")


_DECODER = ("model.layers", "layers")
_SELF = ("self_attn",)
_LVLM_TEXT = Tower("text", ("model.language_model.layers", "language_model.layers"), _SELF, True)
_CLIP_VISION = ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers",
                "vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers")
# Older transformers call the attention function from ViTSelfAttention (attention.attention); 5.23 folded it
# into ViTAttention (attention). The more specific path first, so that older layouts do not hook the wrapper.
_VIT_ATTENTION = ("attention.attention", "attention")
_VISION_ENCODER = ("vision_model.encoder.layers", "encoder.layers")

FAMILIES: tuple[Family, ...] = (
    Family("gpt2", ("gpt2",), "llm", (Tower("text", ("transformer.h", "h"), ("attn",), True),), context="n_positions"),
    Family("llama", ("llama", "mistral", "qwen2"), "llm", (Tower("text", _DECODER, _SELF, True),),
           notes="Llama and kin (Mistral, Qwen2, SmolLM): GQA + RoPE, sliding windows where configured"),
    Family("gemma", ("gemma2", "gemma3_text", "gemma3"), "llm",
           (Tower("text", _DECODER + ("model.language_model.layers",), _SELF, True),),
           notes="soft-capping (Gemma 2) and interleaved sliding windows"),
    Family("gpt_neox", ("gpt_neox",), "llm", (Tower("text", ("gpt_neox.layers", "layers"), ("attention",), True),)),
    Family("bert", ("bert",), "encoder", (Tower("text", ("bert.encoder.layer", "encoder.layer"), ("attention.self",), False),)),
    Family("vit", ("vit",), "vit",
           (Tower("vision", ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"), _VIT_ATTENTION, False),),
           context=None, prefix=("cls",)),
    Family("deit", ("deit",), "vit",
           (Tower("vision", ("deit.layers", "layers", "deit.encoder.layer", "encoder.layer"), _VIT_ATTENTION, False),),
           context=None, prefix=("cls", "distillation")),
    Family("clip", ("clip", "clip_vision_model"), "vit",
           (Tower("vision", _VISION_ENCODER, _SELF, False), Tower("text", ("text_model.encoder.layers",), _SELF, True)),
           context=None, prefix=("cls",), notes="vision tower (and the text tower of a full CLIPModel)"),
    Family("siglip", ("siglip", "siglip_vision_model"), "vit",
           (Tower("vision", _VISION_ENCODER, _SELF, False), Tower("text", ("text_model.encoder.layers",), _SELF, False)),
           context=None, notes="vision tower (no CLS token)"),
    Family("dinov2", ("dinov2", "dinov2_with_registers"), "vit",
           (Tower("vision", ("dinov2.encoder.layer", "dinov2_with_registers.encoder.layer", "encoder.layer"),
                  _VIT_ATTENTION, False),),
           context=None, prefix=("cls",), registers="num_register_tokens", notes="with or without register tokens"),
    Family("llava", ("llava", "llava_next"), "lvlm",
           (_LVLM_TEXT, Tower("vision", _CLIP_VISION, _SELF, False)),
           image_layout="llava", notes="LLaVA-1.5 and LLaVA-NeXT (anyres grids)"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl"), "lvlm",
           (_LVLM_TEXT, Tower("vision", ("model.visual.blocks", "visual.blocks"), ("attn",), False)),
           image_layout="merged", notes="Qwen2-VL and Qwen2.5-VL (M-RoPE, dynamic grids)"),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    return sorted(_BY_MODEL_TYPE)


def family_for(config) -> Family:
    """The adapter for an HF config (by `config.model_type`); a clear error naming the supported ones."""
    model_type = getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(supported_model_types())}"
        )
    return _BY_MODEL_TYPE[model_type]


def resolve(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted path (integers index ModuleLists), or None if absent."""
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def blocks(model: nn.Module, tower: Tower) -> tuple[str, nn.Module] | None:
    """(path, ModuleList) of `tower`'s blocks in `model` (each block maps the residual stream to the next), or
    None when the tower is absent."""
    for path in tower.layers:
        layers = resolve(model, path)
        if layers is not None:
            return path, layers
    return None


def attention_modules(model: nn.Module, family: Family, tower: Tower) -> list[nn.Module] | None:
    """The attention module of each layer of `tower` in `model`, or None when the tower is absent."""
    found = blocks(model, tower)
    if found is None:
        return None
    path, layers = found
    for attention in tower.attention:
        modules = [resolve(block, attention) for block in layers]
        if all(m is not None and hasattr(m, "forward") for m in modules):
            return modules
    raise UnsupportedFamilyError(
        f"{family.name}: blocks at {path!r} have none of the attention modules {tower.attention}; "
        "this version of transformers lays the model out differently"
    )
