"""A planted circuit: a real HF Llama (4 query heads, 2 KV heads) whose weights are set by hand so that one
two-head path does the task "repeat the first word".

Word-level tokenizer. Residual stream blocks of V dims each: TOK (one-hot current token), MEM, OUT.
- Layer 0, head 1 (KV head 0): uniform causal attention (zero query), values = TOK, writes into MEM: the mean of the
  tokens so far.
- Layer 1, head 2 (KV head 1): uniform causal attention, values = MEM, writes into OUT.
- lm_head reads OUT only, so the first word's logit leads. Every other head's output projection is zero, the MLPs
  are zero: those heads provably do nothing, and the path (0, 1) → (1, 2) (through 2's values) → logits is the
  whole circuit. Head (0, 1) has no direct effect on the logits (lm_head does not read MEM).
Task: clean "<name> w w w w", corrupted "<other name> w w w w"; correct = the clean name, foil = the other.
"""

from __future__ import annotations

import json
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import interp

NAMES = "alpha bravo charlie delta echo foxtrot".split()
FILLER = "the a sun rain hill sea".split()
WORDS = ["<unk>", "<eos>", *NAMES, *FILLER]
V = len(WORDS)
HD = 16  # head dim (≥ V)
SENDER, RECEIVER = (0, 1), (1, 2)
CIRCUIT = [SENDER, RECEIVER]
TOK, MEM, OUT = 0, HD, 2 * HD


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def model(dtype=torch.float32) -> interp.Model:
    assert V <= HD
    cfg = LlamaConfig(vocab_size=V, hidden_size=3 * HD, num_attention_heads=4, num_key_value_heads=2, head_dim=HD,
                      intermediate_size=8, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    hf = LlamaForCausalLM(cfg).eval()
    eye = torch.eye(V)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
        hf.model.embed_tokens.weight[:, TOK:TOK + V] = eye
        first, second = hf.model.layers
        # layer 0, KV head 0 (rows 0..HD) carries TOK; query head 1 writes it into MEM
        first.self_attn.v_proj.weight[0:V, TOK:TOK + V] = eye
        first.self_attn.o_proj.weight[MEM:MEM + V, SENDER[1] * HD:SENDER[1] * HD + V] = eye
        # layer 1, KV head 1 (rows HD..2HD) carries MEM; query head 2 writes it into OUT
        second.self_attn.v_proj.weight[HD:HD + V, MEM:MEM + V] = eye
        second.self_attn.o_proj.weight[OUT:OUT + V, RECEIVER[1] * HD:RECEIVER[1] * HD + V] = eye
        hf.lm_head.weight[:, OUT:OUT + V] = eye
    hf = hf.to(dtype)
    return interp.load_model(hf, tokenizer=tokenizer())


def write_task(path, n: int = 12, seed: int = 0) -> None:
    """A JSONL task file: clean / corrupted prompts that differ in the first word."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            name, other = rng.sample(NAMES, 2)
            rest = " ".join(rng.choice(FILLER) for _ in range(4))
            f.write(json.dumps({"clean": f"{name} {rest}", "corrupt": f"{other} {rest}", "correct": f" {name}",
                                "foil": f" {other}"}) + "\n")
