"""organism-llava: a tiny LLaVA (CLIP vision tower + Llama text model) trained here on synthetic visual questions.

Image questions about a 4 × 4 grid scene of 1–3 coloured shapes (no shape twice) can only be answered from the
image; text-only questions (no image) cannot use one. Used to test vision-aware head divergence (VHD) and head
ablations on a real `LlavaForConditionalGeneration` + `LlavaProcessor` whose answers truly depend on the image.

Prompt format (the tokenizer prepends `<s>`; the processor expands `<image>` into 16 image tokens):
    image question:  "<s> <image> what colour is the square"  -> answer word, then "</s>"
    text question:   "<s> what comes after three"             -> answer word, then "</s>"
No "?": the question's last word (e.g. the shape) is the answer position, so a head there can read the image
directly (with a trailing "?" the same model needed far more steps to bind shapes to colours).

Regenerate with `python -m interp.organisms.train_llava` (seeded, one CPU thread, about 8 minutes).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as T
from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers import models as tokenizer_models
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from interp.organisms.scenes import COLOURS, SHAPES, Scene, random_scene

GRID = 4          # scenes are GRID × GRID cells
IMAGE_SIZE = 32   # pixels; one CLIP patch (8 px) is exactly one grid cell
PATCH = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 16 (the CLS token is dropped: strategy "default")
TEST_SEED = 20_250_101
IMAGE_KINDS = ("colour", "exists", "left", "count")
TEXT_KINDS = ("after", "opposite")

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
OPPOSITES = {"yes": "no", "up": "down", "left": "right", "big": "small", "hot": "cold", "day": "night",
             "in": "out", "on": "off"}
OPPOSITES = {**OPPOSITES, **{b: a for a, b in OPPOSITES.items()}}

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
WORDS = ("what", "colour", "is", "the", "there", "a", "left", "of", "how", "many", "shapes", "comes", "after",
         "opposite", *SHAPES, *COLOURS, "yes", "no", *NUMBERS,
         "up", "down", "right", "big", "small", "hot", "cold", "day", "night", "in", "out", "on", "off")
VOCAB = {w: i for i, w in enumerate(dict.fromkeys(SPECIALS + WORDS))}  # word -> id, in a fixed order
IMAGE_TOKEN_ID = VOCAB["<image>"]


# ----------------------------------------------------------------------------- processor and model
def build_processor() -> T.LlavaProcessor:
    """LlavaProcessor: word-level tokenizer (adds <s>, right padding with <pad>) + PIL CLIP image processor
    (32 px, CLIP mean/std; no torchvision needed)."""
    tk = Tokenizer(tokenizer_models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", VOCAB["<s>"])])
    tok = T.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                    pad_token="<pad>", padding_side="right")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return T.LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH, image_token="<image>",
                            vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_config(text_hidden: int = 96, text_layers: int = 4) -> T.LlavaConfig:
    """CLIP vision (hidden 64, 2 layers, 4 heads, 32 px, patch 8) -> 2-layer MLP projector -> Llama text model
    (GQA: 4 query heads, 2 KV heads). vision_feature_layer=-1 so both CLIP layers are used."""
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=64)
    text = dict(model_type="llama", vocab_size=len(VOCAB), hidden_size=text_hidden, intermediate_size=192,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=128, bos_token_id=VOCAB["<s>"], eos_token_id=VOCAB["</s>"],
                pad_token_id=VOCAB["<pad>"], tie_word_embeddings=False, initializer_range=0.1)
    return T.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN_ID,
                         image_seq_length=N_IMAGE_TOKENS, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")


# ----------------------------------------------------------------------------- questions
def image_of(scene: Scene | None):
    """The PIL image of a scene (32 × 32 RGB); None -> the blank image (background only)."""
    return (scene or Scene(GRID, ())).render(IMAGE_SIZE)


def _image_question(rng: np.random.Generator, kind: str) -> dict:
    """One image question of a kind; its answer is read from the scene."""
    want_yes = bool(rng.integers(2))  # exists: drawn once, so yes/no stay balanced
    while True:
        scene = random_scene(rng, GRID, 2 if kind == "left" else 1, 3, unique_shapes=True)
        present = [it.shape for it in scene.items]
        if kind == "colour":
            item = scene.items[int(rng.integers(len(scene.items)))]
            return dict(kind=kind, text=f"<image> what colour is the {item.shape}", answer=item.colour,
                        scene=scene)
        if kind == "exists":
            pool = present if want_yes else [s for s in SHAPES if s not in present]
            if not pool:
                continue  # all three shapes present: no "no" question; draw another scene
            shape = pool[int(rng.integers(len(pool)))]
            return dict(kind=kind, text=f"<image> is there a {shape}", answer="yes" if want_yes else "no",
                        scene=scene)
        if kind == "left":
            i, j = rng.choice(len(scene.items), size=2, replace=False)
            a, b = scene.items[int(i)], scene.items[int(j)]
            if a.col == b.col:
                continue  # same column: "left of" is undefined
            return dict(kind=kind, text=f"<image> is the {a.shape} left of the {b.shape}",
                        answer="yes" if a.col < b.col else "no", scene=scene)
        if kind == "count":
            return dict(kind=kind, text="<image> how many shapes", answer=NUMBERS[len(scene.items) - 1],
                        scene=scene)
        raise ValueError(kind)


def _text_question(rng: np.random.Generator, kind: str) -> dict:
    """One text-only question (no image): next number word, or opposite word."""
    if kind == "after":
        k = int(rng.integers(len(NUMBERS) - 1))
        return dict(kind=kind, text=f"what comes after {NUMBERS[k]}", answer=NUMBERS[k + 1], scene=None)
    word = list(OPPOSITES)[int(rng.integers(len(OPPOSITES)))]
    return dict(kind=kind, text=f"what is the opposite of {word}", answer=OPPOSITES[word], scene=None)


def draw_question(rng: np.random.Generator, image_fraction: float) -> dict:
    if rng.random() < image_fraction:
        return _image_question(rng, IMAGE_KINDS[int(rng.integers(len(IMAGE_KINDS)))])
    return _text_question(rng, TEXT_KINDS[int(rng.integers(len(TEXT_KINDS)))])


def questions(n: int, seed: int, image_fraction: float = 0.8, exclude: set | None = None) -> list[dict]:
    """n questions dict(kind, text, answer, scene or None) from a seeded rng; `text` is the prompt without <s>
    (it starts with "<image>" for image questions). exclude: (text, scene) keys never to return."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        q = draw_question(rng, image_fraction)
        if exclude and q["scene"] is not None and (q["text"], q["scene"]) in exclude:
            continue
        out.append(q)
    return out


def test_set(n: int = 600) -> list[dict]:
    """The fixed held-out set (seed TEST_SEED, 80 % image questions)."""
    return questions(n, TEST_SEED)


# ----------------------------------------------------------------------------- batches, evaluation
def encode(processor, items: list[dict], with_answer: bool, blank: bool = False, no_image: bool = False) -> dict:
    """Processor inputs for items, right padded: input_ids/attention_mask (B, L), pixel_values (n_img, 3, 32, 32)
    for the items that have a scene. with_answer appends " answer </s>". blank: blank images instead;
    no_image: drop "<image>" and the images (image questions asked as text)."""
    texts, images = [], []
    for q in items:
        text = q["text"]
        if q["scene"] is not None:
            if no_image:
                text = text.removeprefix("<image> ")
            else:
                images.append(image_of(None if blank else q["scene"]))
        texts.append(f"{text} {q['answer']} </s>" if with_answer else text)
    return processor(text=texts, images=images or None, padding=True, return_tensors="pt")


@torch.no_grad()
def first_answer_ids(model, processor, items: list[dict], batch_size: int = 100, **enc_kwargs) -> torch.Tensor:
    """Greedy first answer token of each item: argmax of the logits at the last prompt position. (n,) ids."""
    preds = []
    for s in range(0, len(items), batch_size):
        enc = encode(processor, items[s:s + batch_size], with_answer=False, **enc_kwargs)
        logits = model(**enc).logits  # (B, L, V)
        last = enc["attention_mask"].sum(1) - 1  # right padding: last real token
        preds.append(logits[torch.arange(len(last)), last].argmax(-1))
    return torch.cat(preds)


def evaluate(model, processor, items: list[dict]) -> dict:
    """Accuracy of the greedy first answer token, per kind and overall ("image", "text"); for image questions
    also with a blank image ("blank/<kind>") and with the image removed from the prompt ("noimage/<kind>"),
    and the majority-answer rate per kind ("majority/<kind>": what a model ignoring the image can reach)."""
    model.eval()
    gold = torch.tensor([VOCAB[q["answer"]] for q in items])
    kinds = np.array([q["kind"] for q in items])
    img = [i for i, q in enumerate(items) if q["scene"] is not None]
    res = {}

    def add(prefix, correct, idx, ks):
        for k in ks:
            m = [n for n, i in enumerate(idx) if kinds[i] == k]
            res[f"{prefix}{k}"] = float(correct[m].float().mean()) if m else float("nan")

    correct = first_answer_ids(model, processor, items) == gold
    add("", correct, range(len(items)), IMAGE_KINDS + TEXT_KINDS)
    res["image"] = float(correct[img].float().mean())
    res["text"] = float(correct[[i for i in range(len(items)) if i not in set(img)]].float().mean())
    sub = [items[i] for i in img]
    for name, kw in (("blank", dict(blank=True)), ("noimage", dict(no_image=True))):
        c = first_answer_ids(model, processor, sub, **kw) == gold[img]
        add(f"{name}/", c, img, IMAGE_KINDS)
        res[f"{name}/image"] = float(c.float().mean())
    for k in IMAGE_KINDS:
        answers = [q["answer"] for q in items if q["kind"] == k]
        res[f"majority/{k}"] = max(answers.count(a) for a in set(answers)) / len(answers)
    res["n"] = {k: int((kinds == k).sum()) for k in IMAGE_KINDS + TEXT_KINDS}
    return res
