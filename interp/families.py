"""Family adapters: found from the model itself, with a small declarative table where one is needed.

Any model whose attention modules call transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`) is
adapted by `discover`: its attention modules are the modules whose `forward` calls that interface, grouped
into towers by the ModuleList of blocks that holds them (the text decoder, a vision encoder), with the
model's own layer indices (a hybrid stack's Mamba / linear-attention layers are absent), causality from the
modules themselves and the kind (llm / encoder / vit / lvlm) from the towers and the config. A hand-written
`Family(...)` table exists only for what cannot be discovered (image-token layouts and grids, the special
tokens before a ViT's patches) and wins where present. Everything else (head counts, scaling, sliding windows,
soft-capping, positions) is read at run time from what the model passes to its own attention function.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import replace
from functools import lru_cache

import torch.nn as nn
from transformers.models.auto import modeling_auto

from .catalog import (FAMILIES, Family, Tower, UnsupportedFamilyError, supported_model_types,  # noqa: F401
                      table_for)


def family_for(model: nn.Module) -> Family:
    """The adapter of a built HF model: its table where one exists, else one discovered from the model. A table
    without towers adds only what cannot be discovered (image layout, prefix tokens) to the discovered towers."""
    config = getattr(model, "config", None)
    check_supported_config(config)
    table = table_for(config)
    if table is None:
        return discover(model)
    if table.towers:
        return table
    found = discover(model)
    return replace(table, kind=found.kind, towers=found.towers, context=found.context)


def check_supported_config(config) -> None:
    """Refuse, before any weights are read, what no adapter can serve (encoder-decoder models)."""
    if getattr(config, "is_encoder_decoder", False) and table_for(config) is None:
        raise UnsupportedFamilyError(
            f"model_type {getattr(config, 'model_type', None)!r} is an encoder-decoder model, which is not supported "
            f"(its cross-attention reads another stack's keys); supported: decoders, encoders, ViTs and LVLMs whose "
            f"attention goes through transformers' attention interface, and the hand tables "
            f"({', '.join(supported_model_types())})"
        )


# ---------------------------------------------------------------------------------------------------------
# Discovery


@lru_cache(maxsize=None)
def calls_attention_interface(cls: type) -> bool:
    """Whether `cls.forward` calls transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`)."""
    forward = getattr(cls, "forward", None)
    if forward is None:  # not a module (a block without that attribute resolves to None)
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


_VISION = re.compile(r"vision|visual|vit\b|image|img|siglip|clip")
_AUDIO = re.compile(r"audio|speech|whisper")
_TEXT = re.compile(r"text|language")
_CONTEXT = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def _stack_of(path: str, root: nn.Module) -> tuple[str, str] | None:
    """(path of the ModuleList holding the block, path from the block) of an attention module's dotted path,
    split at its last integer index into a ModuleList; None for a module outside any stack of blocks."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i].isdigit() and isinstance(resolve(root, ".".join(parts[:i])), nn.ModuleList):
            return ".".join(parts[:i]), ".".join(parts[i + 1:])
    return None


def _tower_name(stack: str, model: nn.Module) -> str:
    """"vision", "audio" or "text", from the stack's path, else from what the model takes as its main input."""
    low = stack.lower()
    if _VISION.search(low):
        return "vision"
    if _AUDIO.search(low):
        return "audio"
    if _TEXT.search(low):
        return "text"
    return "vision" if getattr(model, "main_input_name", None) == "pixel_values" else "text"


def _is_lvlm(config) -> bool:
    model_type = getattr(config, "model_type", None)
    return any(model_type in getattr(modeling_auto, mapping, {}) for mapping in
               ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES"))


def discover(model: nn.Module) -> Family:
    """The adapter of a built HF model found from the model itself: towers, attention modules, layer indices,
    causality and kind. Raises UnsupportedFamilyError, saying what was looked for, when nothing is found."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    stacks: dict[str, dict[str, object]] = {}  # ModuleList path -> {path from block: first module}
    loose = []
    for path, module in model.named_modules():
        if not path or not calls_attention_interface(type(module)):
            continue
        found = _stack_of(path, model)
        if found is None:
            loose.append(path)
            continue
        stacks.setdefault(found[0], {}).setdefault(found[1], module)
    if not stacks:
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} ({type(model).__name__}) has no hand table "
            f"({', '.join(supported_model_types())}) and none of its modules calls transformers' attention interface "
            f"(ALL_ATTENTION_FUNCTIONS) from inside a stack of blocks"
            + (f" (found only {loose})" if loose else "")
            + ": interp captures attention through that interface only"
        )
    towers, used = [], set()
    for stack, by_path in stacks.items():
        blocks_ = resolve(model, stack)
        for rel, module in by_path.items():
            name = _tower_name(stack, model)
            if name in used:
                name = f"{stack}.{rel}"
            used.add(name)
            present = sum(calls_attention_interface(type(resolve(b, rel))) for b in blocks_)  # as attention_modules
            causal = getattr(module, "is_causal", None)
            towers.append(Tower(name, (stack,), (rel,), bool(causal) if isinstance(causal, bool) else name == "text",
                                hybrid=present < len(blocks_)))
    has_text = any(t.name == "text" for t in towers)
    has_vision = any(t.name == "vision" for t in towers)
    if not has_text and getattr(model, "main_input_name", None) == "input_ids":
        raise UnsupportedFamilyError(
            f"model_type {model_type!r} ({type(model).__name__}) has no hand table and its text layers do not call "
            f"transformers' attention interface (ALL_ATTENTION_FUNCTIONS; only {[t.layers[0] for t in towers]} do): "
            "interp captures attention through that interface only"
        )
    if has_vision and has_text and (_is_lvlm(config) or image_token(config) is not None):
        kind = "lvlm"
    elif has_vision and not any(t.name == "text" and t.causal for t in towers):
        kind = "vit"
    else:
        text = [t for t in towers if t.name == "text"]
        kind = "llm" if text and text[0].causal else "encoder"
    first = "vision" if kind == "vit" else "text"
    towers.sort(key=lambda t: t.name != first)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    context = None if kind == "vit" else next((a for a in _CONTEXT if isinstance(getattr(text_config, a, None), int)), None)
    return Family(model_type, (model_type,), kind, tuple(towers), context=context,
                  image_layout="tokens" if kind == "lvlm" else None,
                  notes="discovered from the model (no hand table)")


def image_token(config) -> int | None:
    """The id of the token that stands for image patches in an LVLM's text stream, from its config (or None)."""
    for key in ("image_token_id", "image_token_index"):
        if getattr(config, key, None) is not None:
            return int(getattr(config, key))
    return None


# ---------------------------------------------------------------------------------------------------------
# Resolving a tower in a model


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


def attention_modules(model: nn.Module, family: Family, tower: Tower) -> list[nn.Module | None] | None:
    """The attention module of each block of `tower` in `model` (None for a hybrid stack's blocks without
    softmax attention), or None when the tower is absent."""
    found = blocks(model, tower)
    if found is None:
        return None
    path, layers = found
    for attention in tower.attention:
        modules = [resolve(block, attention) for block in layers]
        if tower.hybrid:
            modules = [m if m is not None and calls_attention_interface(type(m)) else None for m in modules]
            if any(m is not None for m in modules):
                return modules
        elif all(m is not None and hasattr(m, "forward") for m in modules):
            return modules
    raise UnsupportedFamilyError(
        f"{family.name}: blocks at {path!r} have none of the attention modules {tower.attention}; "
        "this version of transformers lays the model out differently"
    )
