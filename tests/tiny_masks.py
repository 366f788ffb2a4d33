"""Tiny random-initialised models of transformers' own classes whose attention masks are not plain causal / padding
(issue 29): each `build_<form>(attn)` returns (model, inputs) where `model(**inputs)` runs the mask form named.

    gemma3_images   Gemma 3: two images per sample, image tokens bidirectional inside each image (token_type_ids),
                    causal text; sliding layers with a window (3) shorter than an image (4 tokens)
    paligemma       PaliGemma: prefix-LM (image + prompt bidirectional: token_type_ids 0; answer causal: 1)
    mistral3        Mistral 3 (Pixtral vision): two images of different sizes in one forward, block-diagonal vision
    modernbert      ModernBERT: global layers bidirectional, local layers a symmetric window |i − j| ≤ 2
    siglip2         SigLIP2 (NaFlex) vision: padded patches (pixel_attention_mask with zeros)
    llama4_chunked  Llama 4 text: chunked attention (chunks of 5 over 12 tokens, left padding shifts the chunks)
    llama_packed    Llama: several documents packed in each row (position_ids restarting at 0, no 2-D mask)
    llama_packed_4d the same documents as a custom 4-D block-diagonal causal mask
    llama, gemma2_softcap, bert, vit: controls (causal + left padding; sliding window + soft-capping;
                    bidirectional + padding; no mask)

Built in the tests, never downloaded. `make(form, attn)` seeds, builds and sets the attention implementation.
"""
import torch
import transformers as T

import tiny_models

IMG = 127  # image token id in every LVLM here; text ids are drawn from [3, 96)
BOI, EOI = 125, 124
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)  # 16 patches


def _words(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 96, (n,), generator=g)


def _pix(*shape, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _left_pad(rows: list[torch.Tensor], *extra: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(ids, attention mask, *extra rows) left-padded with 0 to the longest row."""
    n = max(len(r) for r in rows)
    out = [torch.zeros(len(rows), n, dtype=torch.long) for _ in range(2 + len(extra))]
    for b, r in enumerate(rows):
        out[0][b, n - len(r):] = r
        out[1][b, n - len(r):] = 1
        for t, e in zip(out[2:], extra):
            t[b, n - len(r):] = e[b]
    return tuple(out)


# ----------------------------------------------------------------------------- LVLMs
GEMMA3_TOKENS = 4  # pooled cells per image (2 × 2 from 4 × 4 patches)


def gemma3_row(seed: int, n_images: int = 2) -> torch.Tensor:
    """text, then per image <boi> 4 × <image> <eoi> and more text (as Gemma3Processor lays an image out)."""
    parts = [torch.tensor([1]), _words(2, seed)]
    for i in range(n_images):
        parts += [torch.tensor([BOI]), torch.full((GEMMA3_TOKENS,), IMG), torch.tensor([EOI]), _words(2, seed + 1 + i)]
    return torch.cat(parts)


def build_gemma3_images(attn):
    cfg = T.Gemma3Config(
        text_config={**TEXT, "model_type": "gemma3_text", "head_dim": 8, "query_pre_attn_scalar": 8,
                     "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
        vision_config=SIGLIP, mm_tokens_per_image=GEMMA3_TOKENS, image_token_index=IMG, boi_token_index=BOI,
        eoi_token_index=EOI)
    rows = [gemma3_row(10), gemma3_row(20)[4:]]  # the second row shorter: left padding
    ids, mask = _left_pad(rows)
    n_images = int((ids == IMG).sum()) // GEMMA3_TOKENS
    model = T.Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # initialised to zeros: every image would give the same (zero) features
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    return model, {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": (ids == IMG).long(),
        "pixel_values": _pix(n_images, 3, 32, 32)}


PALIGEMMA_TOKENS = 16  # (32 / 8)^2 patches, one token each


def build_paligemma(attn):
    cfg = T.PaliGemmaConfig(vision_config=SIGLIP, text_config={**TEXT, "model_type": "gemma", "head_dim": 8},
                            image_token_index=IMG, projection_dim=32)
    cfg.text_config.num_image_tokens = PALIGEMMA_TOKENS
    rows, types = [], []
    for seed, (n_prompt, n_answer) in ((30, (4, 3)), (40, (2, 2))):
        # as PaliGemmaProcessor: <image> × 16, <bos>, prompt, "\n", then the suffix (answer) of token type 1
        prefix = torch.cat([torch.full((PALIGEMMA_TOKENS,), IMG), torch.tensor([1]), _words(n_prompt, seed),
                            torch.tensor([5])])
        answer = _words(n_answer, seed + 1)
        rows.append(torch.cat([prefix, answer]))
        types.append(torch.cat([torch.zeros(len(prefix), dtype=torch.long), torch.ones(n_answer, dtype=torch.long)]))
    ids, mask, token_types = _left_pad(rows, types)
    return T.PaliGemmaForConditionalGeneration(cfg), {
        "input_ids": ids, "attention_mask": mask, "token_type_ids": token_types, "pixel_values": _pix(2, 3, 32, 32)}


MISTRAL3_SIZES = [(16, 16), (16, 24)]  # (H, W) px: 4 × 4 and 4 × 6 patches of 4 px → 2 × 2 and 2 × 3 tokens


def build_mistral3(attn):
    cfg = T.Mistral3Config(
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=24, patch_size=4, head_dim=8),
        text_config={**TEXT, "model_type": "mistral", "head_dim": 8, "sliding_window": None},
        image_token_index=IMG, spatial_merge_size=2, vision_feature_layer=-1)
    n_tok = [(h // 8) * (w // 8) for h, w in MISTRAL3_SIZES]
    row = torch.cat([torch.tensor([1]), _words(2, 50), torch.full((n_tok[0],), IMG), _words(2, 51),
                     torch.full((n_tok[1],), IMG), _words(3, 52)])
    pix = torch.zeros(2, 3, 16, 24)
    for i, (h, w) in enumerate(MISTRAL3_SIZES):
        pix[i, :, :h, :w] = _pix(3, h, w, seed=3 + i)
    return T.Mistral3ForConditionalGeneration(cfg), {
        "input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long), "pixel_values": pix,
        "image_sizes": torch.tensor(MISTRAL3_SIZES)}


# ----------------------------------------------------------------------------- encoders, ViTs
MODERNBERT_LOCAL = 4  # local_attention: a window of |i − j| ≤ 4 // 2 = 2


def build_modernbert(attn):
    cfg = T.ModernBertConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4, max_position_embeddings=128, global_attn_every_n_layers=3,
                             local_attention=MODERNBERT_LOCAL, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                             cls_token_id=1, sep_token_id=2)
    g = torch.Generator().manual_seed(60)
    ids = torch.randint(3, 96, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0  # right padding in the second row
    ids[1, 10:] = 0
    return T.ModernBertModel(cfg), {"input_ids": ids, "attention_mask": mask}


SIGLIP2_PATCHES = 16


def build_siglip2(attn):
    cfg = T.Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_channels=3, num_patches=SIGLIP2_PATCHES, patch_size=4)
    shapes = torch.tensor([[4, 4], [3, 3]])  # the second image: 9 real patches, 7 padding
    pix = torch.zeros(2, SIGLIP2_PATCHES, 3 * 4 * 4)
    mask = torch.zeros(2, SIGLIP2_PATCHES, dtype=torch.long)
    for b, (h, w) in enumerate(shapes.tolist()):
        pix[b, : h * w] = _pix(h * w, 3 * 4 * 4, seed=7 + b)
        mask[b, : h * w] = 1
    return T.Siglip2VisionModel(cfg), {"pixel_values": pix, "pixel_attention_mask": mask, "spatial_shapes": shapes}


# ----------------------------------------------------------------------------- decoders
LLAMA4_CHUNK = 5


def build_llama4_chunked(attn):
    cfg = T.Llama4TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                             max_position_embeddings=256, attention_chunk_size=LLAMA4_CHUNK, num_local_experts=2,
                             num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 0],
                             layer_types=["chunked_attention", "full_attention"],
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    g = torch.Generator().manual_seed(70)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the second row's chunks start at its first real token
    ids[1, :3] = 0
    return T.Llama4ForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask}


PACKED_DOCS = [[4, 5, 3], [6, 6]]  # document lengths in each row (12 tokens a row)


def packed_positions(docs=PACKED_DOCS) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])


def build_llama_packed(attn):
    cfg = T.LlamaConfig(**tiny_models.COMMON_LM, num_key_value_heads=2)
    g = torch.Generator().manual_seed(80)
    ids = torch.randint(3, 96, (2, 12), generator=g)
    # transformers' packing: position_ids restarting at 0 with no 2-D mask and no cache
    # (masking_utils.find_packed_sequence_indices → packed_sequence_mask_function)
    return T.LlamaForCausalLM(cfg), {"input_ids": ids, "position_ids": packed_positions(), "use_cache": False}


def packed_mask_4d(docs=PACKED_DOCS) -> torch.Tensor:
    """(B, 1, N, N) float: 0 where a query sees a key (causal inside its own document), the dtype's lowest elsewhere."""
    pos = packed_positions(docs)
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in docs])
    n = pos.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal & (doc[:, :, None] == doc[:, None, :])
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]


def build_llama_packed_4d(attn):
    """The same packed documents, given as a custom 4-D mask (returned as-is by masking_utils'
    `_preprocess_mask_arguments`): a float mask, which both SDPA and eager (which adds it to the logits) read."""
    model, inputs = build_llama_packed(attn)
    return model, dict(inputs, attention_mask=packed_mask_4d())


def build_llama(attn):
    return tiny_models.build_llama(attn)


def build_gemma2_softcap(attn):
    return tiny_models.build_gemma2(attn, softcap=5.0)


def build_bert(attn):
    return tiny_models.build_bert(attn)


def build_vit(attn):
    return tiny_models.build_vit(attn)


BUILDERS = {k[len("build_"):]: v for k, v in dict(globals()).items() if k.startswith("build_")}
FORMS = ["gemma3_images", "paligemma", "mistral3", "modernbert", "siglip2", "llama4_chunked", "llama_packed",
         "llama_packed_4d"]
CONTROLS = ["llama", "gemma2_softcap", "bert", "vit"]
LVLMS = ["gemma3_images", "paligemma", "mistral3"]


def make(form: str, attn: str = "sdpa", seed: int = 0):
    """(model, inputs) of a form with the given attention implementation; same seed → same weights. Where the
    family refuses `attn` (Gemma 2 with soft-capping has no SDPA path), it keeps eager."""
    torch.manual_seed(seed)
    model, inputs = BUILDERS[form](attn)
    try:
        model.set_attn_implementation(attn)
    except (ValueError, ImportError):
        model.set_attn_implementation("eager")
    return model.eval(), inputs


class FixedProcessor:
    """A stand-in processor for a tiny LVLM / ViT: whatever text and images it is given, it returns one sample of
    the fixed inputs its builder made (the analyses then run from text and images as on a real checkpoint)."""

    def __init__(self, inputs: dict, tokenizer=None, image_token: str = "<image>", row: int = 0):
        self.fixed = {k: v[row:row + 1] if isinstance(v, torch.Tensor) and k not in ("pixel_values", "image_sizes")
                      else v for k, v in inputs.items()}
        self.tokenizer, self.image_token = tokenizer, image_token
        self.chat_template = None

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs):
        return T.BatchFeature({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in self.fixed.items()})
