"""`vhd` on a prefix-LM (PaliGemma: image and prompt one bidirectional prefix, the answer causal). The truth is the
model's own generation with the KV cache, read at the output projection's input (forward pre-hooks, independent of
interp's capture): the teacher-forced answer must be marked as generation marks it, so that the prompt's head
outputs are those of the prompt alone and each answer position's are those of the generation step."""

import pytest
import torch
import transformers as T
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

import interp
from interp.analyses.images import load_image
from interp.analyses.inputs import greedy, lvlm_prompt
from interp.analyses.vhd import head_outputs, image_free_inputs, teacher_forced

IMG, BOI, EOI = 127, 125, 124
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, image_size=32, patch_size=8)  # 16 patches
PROMPT = "w5 w9 w11"
NEWLINE = IMG - 1  # "\n": the processor closes PaliGemma's prefix with it
# PaliGemma's layout of lvlm_prompt's "<image>\nw5 w9 w11" without the image tokens: <bos> \n w5 w9 w11 \n
DROPPED = [1, NEWLINE, 5, 9, 11, NEWLINE]


def paligemma_with_processor() -> interp.Model:
    """A tiny random PaliGemma with a real PaliGemmaProcessor (word-level tokenizer with "\\n" a token, 32 px SigLIP
    images, 16 image tokens) and an untied LM head (the tied one only repeats the last token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"w{i}": i for i in range(3, NEWLINE)}, "\n": NEWLINE,
             "<image>": IMG}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                    pad_token="<pad>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_tokens(["\n"])
    images = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    images.image_seq_length = 16
    torch.manual_seed(0)
    cfg = T.PaliGemmaConfig(vision_config=SIGLIP, text_config={**TEXT, "model_type": "gemma"}, image_token_index=IMG,
                            projection_dim=32)
    cfg.text_config.num_image_tokens = 16
    hf = T.PaliGemmaForConditionalGeneration(cfg).eval()
    hf.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn_like(hf.lm_head.weight))
    return interp.load_model(hf, processor=T.PaliGemmaProcessor(image_processor=images, tokenizer=tok))


@pytest.fixture(scope="module")
def paligemma():
    return paligemma_with_processor()


def _o_proj_calls(model, run) -> list[torch.Tensor]:
    """The input of every text layer's o_proj in each forward call that run() makes: [(L, N, H·d) per call]."""
    modules = model.attention_modules()
    seen = [[] for _ in modules]
    handles = [m.o_proj.register_forward_pre_hook(lambda mod, args, i=i: seen[i].append(args[0][0].detach().clone()))
               for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return [torch.stack(per_layer) for per_layer in zip(*seen)]


class _Force(LogitsProcessor):
    """Greedy decoding forced onto the given tokens, one per step."""

    def __init__(self, tokens: torch.Tensor, start: int):
        self.tokens, self.start = tokens, start

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[input_ids.shape[1] - self.start]] = 0.0
        return forced


def _generated(model, inputs: dict, answer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own generation with the KV cache, forced onto `answer` (T,): the prompt forward's o_proj inputs
    (L, N, H·d), and at each step the o_proj input of the position that produces answer token t: (L, T, H·d)."""
    n = inputs["input_ids"].shape[1]
    out = {}

    def run():
        out["ids"] = model.hf.generate(**inputs, max_new_tokens=len(answer), do_sample=False, pad_token_id=0,
                                       logits_processor=LogitsProcessorList([_Force(answer, n)]))
    calls = _o_proj_calls(model, run)
    assert torch.equal(out["ids"][0, n:], answer) and len(calls) == len(answer)
    return calls[0], torch.stack([c[:, -1] for c in calls], 1)


def _naive(inputs: dict, answer: torch.Tensor) -> dict:
    """The answer appended with token type 0 (the former teacher forcing): it joins the bidirectional prefix."""
    full = {k: v for k, v in inputs.items() if k != "labels"}
    full["input_ids"] = torch.cat([inputs["input_ids"], answer[None, :-1]], -1)
    for key in ("attention_mask", "token_type_ids"):
        fill = torch.ones if key == "attention_mask" else torch.zeros
        full[key] = torch.cat([inputs[key], fill(1, len(answer) - 1, dtype=torch.long)], -1)
    return full


def _inputs(model, construction: str, image) -> dict:
    if construction == "image":
        return model.prepare(lvlm_prompt(model, PROMPT), images=[image])
    return image_free_inputs(model, PROMPT, image, construction)


def test_drop_leaves_the_image_tokens_out_of_the_prefix(paligemma):
    """PaliGemma's processor requires an image: "drop" is its layout without the image's tokens, all of it the prefix
    (token type 0), and no pixels."""
    without = image_free_inputs(paligemma, PROMPT, load_image(0), "drop")
    assert set(without) == {"input_ids", "attention_mask", "token_type_ids"}
    assert without["input_ids"].tolist() == [DROPPED]
    assert without["token_type_ids"].tolist() == [[0] * 6] and without["attention_mask"].tolist() == [[1] * 6]


@pytest.mark.parametrize("construction", ["image", "blank", "drop"])
def test_teacher_forcing_reproduces_generation(paligemma, construction):
    """The teacher-forced forward marks the answer as PaliGemma's generation does (token type 1, the causal suffix):
    its head outputs at the prompt's positions equal the prompt-only forward's (≤ 1e-6), and at each answer position
    those of the generation step with the KV cache (≤ 1e-5); so do `head_outputs` (through interp's capture). The
    former marking (token type 0) fails the first check."""
    image = load_image(1)
    answer = greedy(paligemma, _inputs(paligemma, "image", image), 4)
    assert len(answer) >= 3, answer
    inputs = _inputs(paligemma, construction, image)
    n = inputs["input_ids"].shape[1]
    full = teacher_forced(paligemma, inputs, answer)
    assert full["token_type_ids"].tolist() == [[0] * n + [1] * (len(answer) - 1)]
    prompt, steps = _generated(paligemma, inputs, answer)                               # (L, n, H·d), (L, T, H·d)
    forced = _o_proj_calls(paligemma, lambda: paligemma.hf(**full))[0]                 # (L, n + T − 1, H·d)
    assert (forced[:, :n] - prompt).abs().max() <= 1e-6
    assert (forced[:, n - 1:] - steps).abs().max() <= 1e-5
    naive = _o_proj_calls(paligemma, lambda: paligemma.hf(**_naive(inputs, answer)))[0]
    assert (naive[:, :n] - prompt).abs().max() > 1e-3  # the answer inside the prefix: the prompt sees it

    got = head_outputs(paligemma, inputs, answer, interp.analyses.Options())            # (L, H, T, d)
    d = paligemma.config.text_config.head_dim
    assert (got - steps.unflatten(-1, (-1, d)).transpose(1, 2)).abs().max() <= 1e-5


@pytest.mark.parametrize("construction", ["drop", "blank"])
def test_vhd_on_paligemma_equals_generation(paligemma, construction):
    """`vhd` end to end: each step's VHD is the norm of the difference of the per-head outputs of generation with
    the image and without it (forced onto the answer generated with the image)."""
    result = interp.score(paligemma, "vhd", samples=2, prompt=PROMPT, max_new_tokens=4, no_image=construction)
    steps = result.tables["steps"]
    d = paligemma.config.text_config.head_dim
    for i, sample in enumerate(result.meta["plan"]):
        image = load_image(sample["image"])
        with_image = _inputs(paligemma, "image", image)
        answer = greedy(paligemma, with_image, 4)
        if construction == "drop":
            n = len(DROPPED)
            without = {"input_ids": torch.tensor([DROPPED]), "attention_mask": torch.ones(1, n, dtype=torch.long),
                       "token_type_ids": torch.zeros(1, n, dtype=torch.long)}
        else:
            black = Image.new("RGB", image.size, (0, 0, 0))
            without = paligemma.prepare(lvlm_prompt(paligemma, PROMPT), images=[black])
        a, b = _generated(paligemma, with_image, answer)[1], _generated(paligemma, without, answer)[1]
        want = (a - b).unflatten(-1, (-1, d)).pow(2).sum(-1).sqrt()                      # (L, T, H)
        got = steps[steps["sample"] == i]
        assert len(got) == want.numel()
        for r in got.itertuples():
            assert r.vhd == pytest.approx(float(want[r.layer, r.step, r.head]), rel=1e-4, abs=1e-6)
    assert result.meta["params"]["no_image"] == construction


def test_gemma3_answer_is_teacher_forced_as_generated():
    """Gemma 3's token_type_ids mark its images (bidirectional inside each image), not a prefix: generation marks
    generated tokens as text, and the teacher-forced forward equals generation with the KV cache at every answer
    position (≤ 1e-5) and the prompt-only forward at the prompt's positions (≤ 1e-6)."""
    torch.manual_seed(0)
    cfg = T.Gemma3Config(text_config={**TEXT, "model_type": "gemma3_text", "query_pre_attn_scalar": 8,
                                      "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]},
                         vision_config=SIGLIP, mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=BOI,
                         eoi_token_index=EOI)
    model = interp.load_model(T.Gemma3ForConditionalGeneration(cfg).eval())
    ids = torch.tensor([[1, 5, 9, BOI, IMG, IMG, IMG, IMG, EOI, 11, 17]])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": (ids == IMG).long(),
              "pixel_values": torch.randn(1, 3, 32, 32)}
    answer = torch.tensor([5, 17, 9, 30])
    full = teacher_forced(model, inputs, answer)
    assert full["token_type_ids"].tolist() == [(ids[0] == IMG).long().tolist() + [0, 0, 0]]
    prompt, steps = _generated(model, inputs, answer)
    forced = _o_proj_calls(model, lambda: model.hf(**full))[0]
    n = ids.shape[1]
    assert (forced[:, :n] - prompt).abs().max() <= 1e-6
    assert (forced[:, n - 1:] - steps).abs().max() <= 1e-5
