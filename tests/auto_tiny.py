"""Tiny random-initialised models of every decoder type the installed transformers maps to a causal LM.

The model types come from transformers' own auto mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), not a hand list.
`tiny(model_type)` shrinks the type's default config (sizes, layers, heads, experts, latent ranks, vocab) and
builds its causal-LM class in float32; `TinyUnbuildable` says why transformers itself cannot build or run it.
"""

import torch
import transformers as T
from transformers.models.auto import configuration_auto, modeling_auto

VOCAB = 96
# Every size-like config attribute a family may have, and the value a tiny model takes.
SIZES = {
    "vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB, "hidden_size_per_layer_input": 8, "hidden_size": 32, "n_embd": 32, "d_model": 32, "dim": 32, "embed_dim": 32,
    "intermediate_size": 48, "ffn_hidden_size": 48, "n_inner": 48, "ffn_dim": 48, "inner_hidden_size": 48,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4,
    "num_key_value_heads": 2, "n_kv_heads": 2, "num_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 8, "kv_channels": 8, "attention_head_dim": 8,
    "max_position_embeddings": 256, "n_positions": 256, "n_ctx": 256, "seq_length": 256, "max_sequence_length": 256,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "num_shared_experts": 1, "n_shared_experts": 1,
    "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16, "expert_intermediate_size": 16,
    "q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 6,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "sliding_window": 5, "attention_chunk_size": 5, "sliding_window_size": 5, "window_size": 5,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8,
    "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1,
    "mamba_expand": 2, "ssm_state_size": 8, "state_size": 8, "conv_kernel": 4, "time_step_rank": 4,
    "num_mamba_heads": 4,
}
# Types whose `layer_types` / period needs more layers before any of them is a softmax-attention layer.
DEEP = 8


class TinyUnbuildable(Exception):
    """transformers itself cannot build or run a tiny model of this type (the reason is the message)."""


class TooLarge(Exception):
    """The shrunk config is still not tiny: this file does not know the names of that type's sizes."""


MAX_PARAMS = 5_000_000


def decoder_types() -> list[str]:
    """The model types of the installed transformers' causal-LM auto mapping (encoder-decoders left out)."""
    return sorted(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _layer_choice(config, layers: int) -> list[int]:
    """Which of the default config's layers a tiny model keeps: the first layer of each kind (`layer_types`)
    in order, then the next ones, so that a hybrid stack keeps an attention layer and its other kinds."""
    types = getattr(config, "layer_types", None)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(types, list) or not isinstance(n, int) or len(types) != n:
        return list(range(layers))
    first = sorted({t: i for i, t in reversed(list(enumerate(types)))}.values())
    rest = [i for i in range(n) if i not in first]
    return sorted((first + rest)[: max(layers, len(first))])


def _per_layer(config, keep: list[int]) -> dict | None:
    """A heterogeneous config's per-layer sizes (Gemma 4: head_dim; dots3: heads) for the kept layers, each
    distinct value mapped to a distinct tiny one (the smallest to SIZES[name], the next to twice that, ...)."""
    if not getattr(config, "is_heterogeneous", False):
        return None
    view = config.per_layer_config
    layers = [view[i].to_dict() for i in keep]
    out: dict[int, dict] = {i: {} for i in range(len(keep))}
    for name in SIZES:
        values = [layer.get(name) for layer in layers]
        if any(not isinstance(v, int) or isinstance(v, bool) for v in values):
            continue
        distinct = sorted(set(values))
        for i, v in enumerate(values):
            out[i][name] = SIZES[name] * 2 ** distinct.index(v) if name != "num_key_value_heads" else SIZES[name]
    return out


def _shrink(config, layers: int) -> dict:
    """Constructor arguments that make `config` tiny (the attributes it has, at the values of SIZES)."""
    keep = _layer_choice(config, layers)
    n_default = getattr(config, "num_hidden_layers", None)
    kwargs = {}
    for name, value in SIZES.items():
        if name in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            value = len(keep)
        try:
            current = getattr(config, name, None) if name in vars(config) or hasattr(type(config), name) else None
        except RuntimeError:  # a per-layer attribute of a heterogeneous config (Gemma 4): its global value is kept
            continue
        if isinstance(current, bool) or not isinstance(current, int) or current <= 0:
            continue
        kwargs[name] = value
    if "num_key_value_heads" in kwargs and config.num_key_value_heads == config.num_attention_heads:
        kwargs["num_key_value_heads"] = SIZES["num_attention_heads"]  # no GQA in the family: keep it so
    if "qk_rope_head_dim" in kwargs and "head_dim" in kwargs:  # multi-head latent attention: RoPE on that part
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    if "attn_layer_indices" in vars(config):  # hybrids naming their attention layers (Bamba: None by default)
        kwargs["attn_layer_indices"] = [1]
    if isinstance(getattr(config, "rotary_dim", None), int):
        kwargs["rotary_dim"] = 4
    per_layer = _per_layer(config, keep)
    if per_layer is not None:
        kwargs["per_layer_config"] = per_layer
    for name, value in vars(config).items():  # per-layer lists (layer_types, sizes per layer)
        if isinstance(value, list) and isinstance(n_default, int) and len(value) == n_default and n_default > 0:
            kwargs[name] = [value[i] for i in keep]
    if set(kwargs.get("layer_types") or ()) == {"linear_attention"}:  # Granite hybrids default to no attention
        kwargs["layer_types"] = kwargs["layer_types"][:-1] + ["full_attention"]
    return kwargs


def tiny_config(model_type: str, layers: int = 2):
    """A tiny config of `model_type` (its sub-configs shrunk too)."""
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    try:
        default = cls()
    except Exception as e:
        raise TinyUnbuildable(f"default config fails: {type(e).__name__}: {str(e)[:120]}") from e
    if getattr(default, "is_encoder_decoder", False):
        raise TinyUnbuildable("an encoder-decoder model")
    sub = {}
    for key in ("text_config", "vision_config", "audio_config"):
        part = getattr(default, key, None)
        if part is not None and hasattr(part, "to_dict"):
            sub[key] = {**part.to_dict(), **_shrink(part, layers)}
    kwargs = {**_shrink(default, layers), **sub}
    try:
        config = cls(**kwargs)
    except Exception as e:
        raise TinyUnbuildable(f"tiny config fails: {type(e).__name__}: {str(e)[:160]}") from e
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= VOCAB:
            setattr(config, key, 1)
    return config


def tiny(model_type: str, attn: str = "eager", layers: int = 2):
    """(model, config) of `model_type`, float32, eval, with attention implementation `attn`."""
    config = tiny_config(model_type, layers)
    cls = getattr(T, modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type], None)
    if cls is None:
        raise TinyUnbuildable("its causal-LM class is not importable")
    try:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in cls._from_config(config).parameters())
    except Exception as e:
        raise TinyUnbuildable(f"model fails to build: {type(e).__name__}: {str(e)[:160]}") from e
    if n_params > MAX_PARAMS:
        raise TooLarge(f"the shrunk config still has {n_params / 1e6:.0f}M parameters (sizes it names differently)")
    torch.manual_seed(0)
    try:
        model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    except Exception as e:
        raise TinyUnbuildable(f"model fails to build: {type(e).__name__}: {str(e)[:160]}") from e
    return model.eval(), config


def word_tokenizer():
    """A word-level tokenizer over VOCAB ids (<s> prepended): the IOI names and common words, then w<i> fillers."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from interp.analyses.tasks import NAMES

    words = ["<unk>", "<s>", "</s>", *NAMES[:12], *("the a to and of in was is it he she they went store gave "
                                                    "drink said then when after").split()]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words[:VOCAB])}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                     pad_token="</s>")
