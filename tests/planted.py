"""A planted retrieval model: a real HF GPT-2 whose weights are set by hand so that copying is done by known heads.

Word-level tokenizer over a small vocabulary. Residual stream blocks (each mirrored by its negative, so every
residual vector has mean zero and LayerNorm is an exact constant scaling):
  TOK  one-hot current token        POS  (cos, sin) of the position on a half circle
  PREV one-hot previous token (written by the previous-token head)   OUT  one-hot copied token (read by lm_head)
Layer 0, head 0: previous-token head (attends to i − 1 through POS, copies TOK into PREV).
Layer 1, heads 1 and 3: induction heads (query TOK, key PREV: attend to the position after an earlier occurrence
of the current token, copy its TOK into OUT) — the copying heads, the ones the retrieval analysis must find.
Layer 1, head 0: a decoy that attends to earlier occurrences of the current token itself (inside the needle, but
never to the token being generated) and writes nothing. All other heads have zero weights (uniform attention).
"""

from __future__ import annotations

import math

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import interp

FILLER = ("ships sail north past grey rocks while birds fly south over green hills and old men fish near "
          "quiet towns when rain falls on red roofs").split()
NEEDLE_WORDS = "the secret code is alpha bravo charlie delta".split()
WORDS = ["<unk>", "<eos>", ".", *NEEDLE_WORDS, *FILLER]
COPY_HEADS = [(1, 1), (1, 3)]
D, N_HEAD, N_POS = 512, 4, 512
HD = D // N_HEAD


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


def model() -> interp.Model:
    tok = tokenizer()
    v = len(tok)
    blocks = {"TOK": 0, "PREV": 2 * v, "OUT": 4 * v, "POS": 6 * v}  # each block followed by its mirror
    assert 6 * v + 4 <= D and 2 * v <= HD
    cfg = GPT2Config(vocab_size=v, n_positions=N_POS, n_embd=D, n_layer=2, n_head=N_HEAD, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=1, pad_token_id=1, layer_norm_epsilon=1e-12,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()

    def mirrored(block: str, n: int) -> tuple[slice, slice]:
        start = blocks[block]
        return slice(start, start + n), slice(start + n, start + 2 * n)

    tok_s, tok_m = mirrored("TOK", v)
    prev_s, prev_m = mirrored("PREV", v)
    out_s, out_m = mirrored("OUT", v)
    pos_s, pos_m = mirrored("POS", 2)
    eye = torch.eye(v)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        for ln in [hf.transformer.ln_f] + [b.ln_1 for b in hf.transformer.h] + [b.ln_2 for b in hf.transformer.h]:
            ln.weight.fill_(1.0)
        wte, wpe = hf.transformer.wte.weight, hf.transformer.wpe.weight
        wte[:, tok_s], wte[:, tok_m] = eye, -eye
        angle = math.pi * torch.arange(N_POS, dtype=torch.float64) / N_POS
        circle = torch.stack([angle.cos(), angle.sin()], -1).float()
        wpe[:, pos_s], wpe[:, pos_m] = circle, -circle
        hf.lm_head.weight[:, out_s], hf.lm_head.weight[:, out_m] = eye, -eye

        scale0 = math.sqrt(D / 4)  # LayerNorm gain at layer 0: |x|² = 4 (TOK and POS, mirrored), mean 0
        attn0 = hf.transformer.h[0].attn
        q0, k0, v0 = (attn0.c_attn.weight[:, i * D:(i + 1) * D] for i in range(3))
        # previous-token head: query rotated back by one position, so q·k peaks at key position i − 1
        step = math.pi / N_POS
        rot = torch.tensor([[math.cos(step), -math.sin(step)], [math.sin(step), math.cos(step)]])  # x @ rot: angle − step
        sharp = 4e4
        q0[pos_s, 0:2] = sharp * rot
        k0[pos_s, 0:2] = torch.eye(2)
        v0[tok_s, 0:v] = eye
        attn0.c_proj.weight[0:v, prev_s] = eye / scale0
        attn0.c_proj.weight[0:v, prev_m] = -eye / scale0

        attn1 = hf.transformer.h[1].attn
        q1, k1, v1 = (attn1.c_attn.weight[:, i * D:(i + 1) * D] for i in range(3))
        scale1 = math.sqrt(D / 6)  # TOK, POS and PREV
        for _, head in COPY_HEADS:  # induction: query = current token, key = previous token at the key
            h0 = head * HD
            q1[tok_s, h0:h0 + v] = 8 * eye
            k1[prev_s, h0:h0 + v] = eye
            v1[tok_s, h0:h0 + v] = eye
            attn1.c_proj.weight[h0:h0 + v, out_s] = 3 * eye / scale1
            attn1.c_proj.weight[h0:h0 + v, out_m] = -3 * eye / scale1
        q1[tok_s, 0:v] = 8 * eye  # decoy (head 0): the current token's own earlier occurrences, writes nothing
        k1[tok_s, 0:v] = eye
    hf.generation_config.eos_token_id = 1
    hf.generation_config.pad_token_id = 1
    return interp.load_model(hf, tokenizer=tok)
