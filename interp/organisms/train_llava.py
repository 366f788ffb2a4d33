"""Training of organism-llava (`interp.organisms.llava`): the run, the held-out metrics and its model card.

Run `python -m interp.organisms.train_llava` to regenerate the committed weights."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import transformers as T

from interp.organisms.llava import (GRID, IMAGE_KINDS, IMAGE_SIZE, IMAGE_TOKEN_ID, N_IMAGE_TOKENS, PATCH, TEST_SEED,
                                    TEXT_KINDS, VOCAB, build_config, build_processor, draw_question, encode, evaluate,
                                    test_set)


def train(out_dir, seed: int = 0, steps: int = 6000, batch_size: int = 32, lr: float = 1e-3,
          warmup: int = 100, weight_decay: float = 0.01, n_test: int = 600, log_every: int = 500) -> dict:
    """Train from scratch (next-token loss on the answer word and </s> only), evaluate on the held-out set,
    save model + processor + metrics.json + MODEL_CARD.md into out_dir. Returns the metrics."""
    out_dir = Path(out_dir)
    t0 = time.time()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster on a busy CPU, and runs are repeatable
    torch.manual_seed(seed)
    processor = build_processor()
    model = T.LlavaForConditionalGeneration(build_config())
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    test = test_set(n_test)
    exclude = {(q["text"], q["scene"]) for q in test if q["scene"] is not None}
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    log = []
    for step in range(steps):
        batch = []
        while len(batch) < batch_size:
            q = draw_question(rng, 0.8)
            if q["scene"] is None or (q["text"], q["scene"]) not in exclude:
                batch.append(q)
        enc = encode(processor, batch, with_answer=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        logits = model(**enc).logits  # (B, L, V)
        length = mask.sum(1, keepdim=True)  # (B, 1)
        pos = torch.arange(ids.shape[1])[None]  # (1, L)
        target = (pos >= length - 2) & (pos < length)  # answer word and </s>
        loss = torch.nn.functional.cross_entropy(logits[:, :-1][target[:, 1:]], ids[target])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            log.append((step, round(loss.item(), 4)))
            print(f"step {step} loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    metrics = evaluate(model, processor, test)
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = VOCAB["<s>"], VOCAB["</s>"]
    model.generation_config.pad_token_id = VOCAB["<pad>"]
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    info = dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup, weight_decay=weight_decay,
                n_params=n_params, train_seconds=round(train_s, 1), torch_threads=1,
                torch=torch.__version__, transformers=T.__version__, loss_log=log)
    (out_dir / "metrics.json").write_text(json.dumps(dict(train=info, test=metrics), indent=1) + "\n")
    (out_dir / "MODEL_CARD.md").write_text(model_card(info, metrics))
    return dict(train=info, test=metrics)


def model_card(info: dict, m: dict) -> str:
    """MODEL_CARD.md text from the training info and held-out metrics."""
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    rows = "\n".join(f"| {k} | {m['n'][k]} | {pct(m[k])} | {pct(m['blank/' + k])} | {pct(m['noimage/' + k])} "
                     f"| {pct(m['majority/' + k])} |" for k in IMAGE_KINDS)
    text_rows = "\n".join(f"| {k} | {m['n'][k]} | {pct(m[k])} |" for k in TEXT_KINDS)
    return f"""# organism-llava

A tiny `LlavaForConditionalGeneration` (CLIP vision tower + Llama text model) trained from scratch in this
repository on synthetic visual question answering. Intended use: testing interpretability tools (vision-aware
head divergence, head ablations, attention to image tokens) on a real Hugging Face LLaVA whose answers truly
depend on the image. Not for any other use. Licence: MIT, like the project.

## Task
Scenes: a {GRID} × {GRID} grid of dark cells with 1–3 shapes (square, circle, triangle; no shape twice) coloured
red, green, blue or yellow (`interp/organisms/scenes.py`), rendered at {IMAGE_SIZE} × {IMAGE_SIZE} px, so one
{PATCH} px CLIP patch is one grid cell. 80 % image questions (kinds drawn uniformly), 20 % text-only:

| kind | prompt (after `<s>`) | answers |
|---|---|---|
| colour | `<image> what colour is the {{shape}}` (shape present) | red / green / blue / yellow |
| exists | `<image> is there a {{shape}}` (balanced) | yes / no |
| left | `<image> is the {{A}} left of the {{B}}` (columns differ) | yes / no |
| count | `<image> how many shapes` | one / two / three |
| after | `what comes after {{one..nine}}` | next number word |
| opposite | `what is the opposite of {{word}}` (yes up left big hot day in on and back) | opposite word |

The answer is one word followed by `</s>`; the loss is the next-token loss on these two tokens only.
There is no "?": the last prompt word is the answer position (with a trailing "?" the binding of shapes to
colours and places was learnt far more slowly).
The processor expands `<image>` into {N_IMAGE_TOKENS} image tokens (id {IMAGE_TOKEN_ID}); the tokenizer prepends `<s>`.

## Vocabulary ({len(VOCAB)} words, word-level, whitespace split)
`{' '.join(VOCAB)}`

## Architecture ({info['n_params']:,} parameters, fp32 safetensors)
- Vision: CLIP, hidden 64, 2 layers, 4 heads, MLP 256, image 32 px, patch 8 → 16 patches + CLS;
  `vision_feature_layer=-1` (last layer), `vision_feature_select_strategy="default"` (CLS dropped).
- Projector: LLaVA default (Linear 64→96, GELU, Linear 96→96).
- Text: Llama, hidden 96, 4 layers, 4 query heads / 2 KV heads (GQA), head dim 24, MLP 192, untied embeddings,
  RoPE, `initializer_range=0.1` (0.02 gave a long plateau before the image was used).

## Training
Seed {info['seed']}, {info['steps']} steps, batch {info['batch_size']} (fresh questions each step from a seeded rng;
image questions equal to a held-out one are skipped), AdamW lr {info['lr']} (betas 0.9/0.98, weight decay
{info['weight_decay']}), {info['warmup']} warm-up steps then cosine to 10 %, grad-norm clip 1.
{info['train_seconds']:.0f} s on this machine's CPU (2 shared cores; torch.set_num_threads({info['torch_threads']});
torch {info['torch']}, transformers {info['transformers']}). Loss log (step, loss): {info['loss_log']}.

## Held-out accuracy (greedy first answer token, {sum(m['n'].values())} questions, seed {TEST_SEED})
Image questions: {pct(m['image'])}; with a blank image instead: {pct(m['blank/image'])}; with the image removed
from the prompt: {pct(m['noimage/image'])}. Text-only questions: {pct(m['text'])}.

| kind | n | accuracy | blank image | no image | majority answer |
|---|---|---|---|---|---|
{rows}

| text kind | n | accuracy |
|---|---|---|
{text_rows}

The image-question scenes are held out (never seen in training); the text-only questions are only 25
distinct prompts, so their accuracy is in-distribution recall. The blank-image and no-image columns show that
image answers depend on the image (they fall to about the rate of a fixed guess).

## Use
```python
import transformers
model = transformers.LlavaForConditionalGeneration.from_pretrained(folder)
processor = transformers.AutoProcessor.from_pretrained(folder)  # PIL CLIP image processor; no torchvision
from interp.organisms.llava import image_of, test_set
q = test_set()[0]
enc = processor(text=q["text"], images=image_of(q["scene"]), return_tensors="pt")
word = processor.tokenizer.decode(model(**enc).logits[0, -1].argmax())
```
Batches are right padded: read the logits at the last real token (`attention_mask.sum(1) - 1`).

## Regenerate
`python -m interp.organisms.train_llava` (writes this folder; all randomness is seeded and training runs on one
thread, so a rerun on the same CPU and library versions gives the same weights).
"""


def main():
    out = Path(__file__).resolve().parents[1] / "data" / "organism-llava"
    result = train(out)
    print(json.dumps(result["test"], indent=1))


if __name__ == "__main__":
    main()
