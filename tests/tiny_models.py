"""Tiny random-initialised HF models (transformers 5.23, CPU, no downloads).

Each `build_<family>(attn)` returns (model, inputs) where `model(**inputs)` works; `make` seeds and sets the
attention implementation. Built in the tests, never downloaded.
"""
import torch
import transformers as T

SEQ = 12
COMMON_LM = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=128)


def _ids(vocab=128, seq=SEQ, batch=2, low=3):
    g = torch.Generator().manual_seed(1)
    return torch.randint(low, vocab, (batch, seq), generator=g)


def _pix(*shape):
    g = torch.Generator().manual_seed(2)
    return torch.randn(*shape, generator=g)


def _lm_inputs(vocab=128):
    ids = _ids(vocab)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in 2nd row -> exercises the explicit mask path
    return {"input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------- LLMs
def build_gpt2(attn):
    cfg = T.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                       bos_token_id=0, eos_token_id=0,  # defaults (50256) are outside the tiny vocab -> warning
                       scale_attn_by_inverse_layer_idx=True)  # exercise the layer-idx scaling
    return T.GPT2LMHeadModel(cfg), _lm_inputs()


def build_llama(attn):
    cfg = T.LlamaConfig(**COMMON_LM, num_key_value_heads=2)  # GQA (groups=2)
    return T.LlamaForCausalLM(cfg), _lm_inputs()


def build_mistral(attn):
    cfg = T.MistralConfig(**COMMON_LM, num_key_value_heads=2, sliding_window=4)
    return T.MistralForCausalLM(cfg), _lm_inputs()


def build_qwen2(attn):
    cfg = T.Qwen2Config(**COMMON_LM, num_key_value_heads=2,
                        use_sliding_window=True, sliding_window=4, max_window_layers=1)  # layer1 sliding
    return T.Qwen2ForCausalLM(cfg), _lm_inputs()


def build_gemma2(attn, softcap=None):
    # Gemma2PreTrainedModel._supports_sdpa = False -> set_attn_implementation("sdpa") raises ValueError,
    # and sdpa_attention_forward raises if softcap is not None. `make` forces sdpa via the config attr
    # (only valid with attn_logit_softcapping=None, default is 50.0). Eager/custom functions get softcap.
    cfg = T.Gemma2Config(**COMMON_LM, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                         sliding_window=4, attn_logit_softcapping=softcap)
    return T.Gemma2ForCausalLM(cfg), _lm_inputs()


def build_gemma3(attn):
    cfg = T.Gemma3TextConfig(**COMMON_LM, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                             sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return T.Gemma3ForCausalLM(cfg), _lm_inputs()


def build_gpt_neox(attn):
    cfg = T.GPTNeoXConfig(**COMMON_LM)
    return T.GPTNeoXForCausalLM(cfg), _lm_inputs()


def build_bert(attn):
    cfg = T.BertConfig(**COMMON_LM)
    return T.BertModel(cfg), _lm_inputs()


# ----------------------------------------------------------------------------- ViTs
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=8)  # 16 patches (+CLS etc.)


def build_vit(attn):
    return T.ViTModel(T.ViTConfig(**VIT)), {"pixel_values": _pix(2, 3, 32, 32)}


def build_deit(attn):
    return T.DeiTModel(T.DeiTConfig(**VIT)), {"pixel_values": _pix(2, 3, 32, 32)}


def build_clip(attn):
    return T.CLIPVisionModel(T.CLIPVisionConfig(**VIT)), {"pixel_values": _pix(2, 3, 32, 32)}


def build_siglip(attn):
    return T.SiglipVisionModel(T.SiglipVisionConfig(**VIT)), {"pixel_values": _pix(2, 3, 32, 32)}


def build_dinov2(attn):
    return T.Dinov2Model(T.Dinov2Config(**VIT)), {"pixel_values": _pix(2, 3, 32, 32)}


def build_dinov2_reg(attn):
    cfg = T.Dinov2WithRegistersConfig(**VIT, num_register_tokens=4)
    return T.Dinov2WithRegistersModel(cfg), {"pixel_values": _pix(2, 3, 32, 32)}


# ----------------------------------------------------------------------------- LVLMs
TXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
           bos_token_id=0, eos_token_id=0)
CLIPV = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
IMG_TOK = 127  # image token id: last vocab id; text ids are drawn from [3, 120)


def _seq_with_image_tokens(n_img_tokens_per_row, pre=3, post=3):
    rows = []
    for n in n_img_tokens_per_row:
        g = torch.Generator().manual_seed(3)
        rows.append(torch.cat([torch.randint(3, 120, (pre,), generator=g),
                               torch.full((n,), IMG_TOK),
                               torch.randint(3, 120, (post,), generator=g)]))
    L = max(len(r) for r in rows)  # left-pad with id 0
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):] = r
        mask[i, L - len(r):] = 1
    return ids, mask


def build_llava(attn):
    cfg = T.LlavaConfig(vision_config=CLIPV, text_config={"model_type": "llama", **TXT},
                        image_token_index=IMG_TOK)  # defaults: vision_feature_layer=-2, strategy "default"
    n_img = (32 // 8) ** 2  # = 16 ; "default" drops CLS, "full" would be 16 + 1
    ids, mask = _seq_with_image_tokens([n_img, n_img])
    return T.LlavaForConditionalGeneration(cfg), {
        "input_ids": ids, "attention_mask": mask, "pixel_values": _pix(2, 3, 32, 32)}


LN_PINPOINTS = [[32, 64], [64, 32], [64, 64]]


def llava_next_num_image_tokens(orig_h, orig_w, image_size=32, patch_size=8, pinpoints=LN_PINPOINTS):
    """Hand copy of LlavaNextProcessor._get_number_of_features for strategy "default" (CLS dropped).
    ("full" with a CLS-bearing CLIP tower crashes in pack_image_features in 5.23.)"""
    from transformers.image_processing_utils import select_best_resolution
    best_h, best_w = select_best_resolution([orig_h, orig_w], pinpoints)
    p = image_size // patch_size
    cur_h, cur_w = p * (best_h // image_size), p * (best_w // image_size)
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7)); cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7)); cur_w -= 2 * ((cur_w - new_w) // 2)
    return p * p + cur_h * cur_w + cur_h  # base image + unpadded grid + one image_newline per grid row


def build_llava_next(attn):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    cfg = T.LlavaNextConfig(vision_config=CLIPV, text_config={"model_type": "llama", **TXT},
                            image_token_index=IMG_TOK, image_grid_pinpoints=LN_PINPOINTS)
    image_sizes = torch.tensor([[30, 60], [50, 40]])  # (H, W) of the *original* images
    n_patches = [image_size_to_num_patches(s, LN_PINPOINTS, 32) for s in image_sizes]  # [3, 5]
    pix = torch.zeros(2, max(n_patches), 3, 32, 32)  # (num_images, max_patches, C, H, W), zero-padded
    for i, n in enumerate(n_patches):
        pix[i, :n] = _pix(n, 3, 32, 32)
    n_tok = [llava_next_num_image_tokens(*s.tolist()) for s in image_sizes]
    ids, mask = _seq_with_image_tokens(n_tok)
    return T.LlavaNextForConditionalGeneration(cfg), {
        "input_ids": ids, "attention_mask": mask, "pixel_values": pix, "image_sizes": image_sizes}


def _qwen_vl_inputs(cfg, grids):
    """pixel_values: (sum t*h*w, C*temporal_patch*patch^2) ; tokens per image = t*h*w/merge^2."""
    v = cfg.vision_config
    grid_thw = torch.tensor(grids)
    n_patches = int(grid_thw.prod(-1).sum())
    pix = _pix(n_patches, v.in_channels * v.temporal_patch_size * v.patch_size ** 2)
    n_tok = [int(t * h * w) // v.spatial_merge_size ** 2 for t, h, w in grids]
    ids, mask = _seq_with_image_tokens(n_tok)
    mm_types = (ids == IMG_TOK).int()  # 0 text, 1 image, 2 video  (required in 5.23 for M-RoPE)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pix,
            "image_grid_thw": grid_thw, "mm_token_type_ids": mm_types}


def build_qwen2_vl(attn):
    cfg = T.Qwen2VLConfig(
        text_config={**TXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMG_TOK, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124)
    # two images: grid (t,h,w) in patch units; h,w divisible by spatial_merge_size
    return T.Qwen2VLForConditionalGeneration(cfg), _qwen_vl_inputs(cfg, [[1, 4, 4], [1, 4, 6]])


def build_qwen2_5_vl(attn):
    cfg = T.Qwen2_5_VLConfig(
        text_config={**TXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=16, fullatt_block_indexes=[1]),  # block0 windowed, block1 full
        image_token_id=IMG_TOK, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124)
    return T.Qwen2_5_VLForConditionalGeneration(cfg), _qwen_vl_inputs(cfg, [[1, 4, 4], [1, 8, 8]])


def build_qwen3_vl(attn):
    cfg = T.Qwen3VLConfig(
        text_config={**TXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                                "mrope_interleaved": True}},
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[1]),
        image_token_id=IMG_TOK, video_token_id=126, vision_start_token_id=125, vision_end_token_id=124)
    return T.Qwen3VLForConditionalGeneration(cfg), _qwen_vl_inputs(cfg, [[1, 4, 4], [1, 4, 6]])


GEMMA3_TOKENS = 4  # pooled cells per image: a 2 × 2 square from 4 × 4 patches (kernel 2)


def build_gemma3_vlm(attn):
    cfg = T.Gemma3Config(
        text_config={**TXT, "model_type": "gemma3_text", "head_dim": 8, "query_pre_attn_scalar": 8,
                     "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"]},
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8),
        mm_tokens_per_image=GEMMA3_TOKENS, image_token_index=IMG_TOK, boi_token_index=125, eoi_token_index=124)
    ids, mask = _seq_with_image_tokens([GEMMA3_TOKENS, GEMMA3_TOKENS])
    # without token_type_ids the image tokens attend causally (with them, bidirectionally inside each image)
    return T.Gemma3ForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                   "pixel_values": _pix(2, 3, 32, 32)}


TILE_TOKENS = 16  # InternVL / Idefics3 tiles: 8 × 8 patches of 4 px, pixel-shuffled 2 × 2 into a 4 × 4 square


def build_internvl(attn):
    cfg = T.InternVLConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=[32, 32], patch_size=[4, 4]),
        text_config={**TXT, "model_type": "qwen2"}, image_token_id=IMG_TOK, downsample_ratio=0.5,
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    ids, mask = _seq_with_image_tokens([2 * TILE_TOKENS, TILE_TOKENS])  # 2 tiles, then 1
    return T.InternVLForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask,
                                                     "pixel_values": _pix(3, 3, 32, 32)}


def build_idefics3(attn):
    cfg = T.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=4),
        text_config={**TXT, "model_type": "llama"}, image_token_id=IMG_TOK, scale_factor=2)
    ids, mask = _seq_with_image_tokens([2 * TILE_TOKENS, TILE_TOKENS])
    pixels = _pix(2, 2, 3, 32, 32)
    pixels[1, 1] = 0  # sample 1 has one tile; its second slot is padding (all zeros), as the processor pads
    return T.Idefics3ForConditionalGeneration(cfg), {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


BUILDERS = {k[len("build_"):]: v for k, v in dict(globals()).items() if k.startswith("build_")}


def make(name: str, attn: str = "sdpa", seed: int = 0, **kwargs):
    """(model, inputs) for a family, with the given attention implementation; same seed -> same weights."""
    torch.manual_seed(seed)
    model, inputs = BUILDERS[name](attn, **kwargs)
    if name == "gemma2" and attn == "sdpa":
        model.config._attn_implementation = "sdpa"  # Gemma 2 refuses sdpa by default; fine without soft-capping
    else:
        model.set_attn_implementation(attn)
    return model.eval(), inputs


def llava_with_processor(n_layers: int = 4, attn: str = "sdpa", seed: int = 0):
    """A tiny random LLaVA with a real LlavaProcessor (word-level tokenizer adding <s>, 32 px CLIP images,
    16 image tokens), so that analyses can run from text and images like on a real checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, IMG_TOK)}, "<image>": IMG_TOK}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = T.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=8, image_token="<image>",
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)
    torch.manual_seed(seed)
    cfg = T.LlavaConfig(vision_config=CLIPV, text_config={"model_type": "llama", **TXT, "num_hidden_layers": n_layers,
                                                           "bos_token_id": 1},
                        image_token_index=IMG_TOK)
    model = T.LlavaForConditionalGeneration(cfg)
    model.set_attn_implementation(attn)
    return model.eval(), proc


def vit_processor():
    """A real ViT image processor for the tiny ViT configs (32 px images)."""
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    return ViTImageProcessorPil(size={"height": 32, "width": 32})
