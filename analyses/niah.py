"""Needle-in-a-haystack samples (Wu et al.'s protocol): a needle sentence inserted at a sentence break at a
chosen depth of a haystack of a chosen length in tokens, a question whose answer is in the needle, the
model's chat template when it has one; the answer's token span located in the prompt; ROUGE-1 recall.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .inputs import BASE_TEMPLATE, CHAT_MESSAGE, DATA, builtin_data, read_user_file


@dataclass(frozen=True)
class Needle:
    """needle: the sentence inserted; question: asked at the end; answer: the part of the needle to retrieve."""

    needle: str
    question: str
    answer: str


_FILLER = builtin_data("filler.json")  # subjects, verbs, objects, where, when


def filler_sentences(seed: int):
    """An endless, reproducible stream of plain filler sentences (no download)."""
    rng = random.Random(seed)
    while True:
        s = " ".join(rng.choice(_FILLER[part]) for part in ("subjects", "verbs", "objects", "where", "when")) + "."
        yield s[0].upper() + s[1:]


def file_sentences(path: str | Path) -> list[str]:
    """The sentences of a text file (split after . ! ? followed by white space)."""
    text = read_user_file(path, "the haystack")
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())) if s.strip()]
    if not sentences:
        raise ValueError(f"the haystack {path} holds no text")
    return sentences


def read_needles(path: str | Path) -> list[Needle]:
    """Needles from JSON lines: {"needle": ..., "question": ..., "answer": ...}, the answer a part of the needle."""
    lines = [line for line in read_user_file(path, "needles").splitlines() if line.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        try:
            obj = json.loads(line)
            needle = Needle(str(obj["needle"]), str(obj["question"]), str(obj["answer"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {n}: expected {{\"needle\", \"question\", \"answer\"}} ({e})") from e
        if needle.answer not in needle.needle:
            raise ValueError(f"{path}, line {n}: the answer {needle.answer!r} is not part of the needle")
        out.append(needle)
    if not out:
        raise ValueError(f"{path} holds no needles")
    return out


NEEDLES = tuple(read_needles(DATA / "needles.jsonl"))  # the built-in needles


def rouge1_recall(reference: str, response: str) -> float:
    """ROUGE-1 recall of `response` against `reference`: the share of the reference's words (with their counts)
    that the response contains. Words as rouge-score's tokenizer makes them (lower case, runs of [a-z0-9]);
    no stemming."""
    ref = re.findall(r"[a-z0-9]+", reference.lower())
    got = re.findall(r"[a-z0-9]+", response.lower())
    if not ref:
        return 0.0
    counts: dict[str, int] = {}
    for w in got:
        counts[w] = counts.get(w, 0) + 1
    hit = 0
    for w in ref:
        if counts.get(w, 0) > 0:
            counts[w] -= 1
            hit += 1
    return hit / len(ref)


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def render(tokenizer, context: str, question: str, template: str | None) -> str:
    """The full prompt text: `template` ({context}, {question}), else the chat template, else BASE_TEMPLATE."""
    if template is not None:
        return template.format(context=context, question=question)
    if getattr(tokenizer, "chat_template", None):
        message = CHAT_MESSAGE.format(context=context, question=question)
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return BASE_TEMPLATE.format(context=context, question=question)


def build_prompt(tokenizer, needle: Needle, length: int, depth: float, sentences, template: str | None) -> str:
    """A prompt of about `length` tokens: haystack sentences with the needle inserted at the sentence break at or
    before `depth` percent of the haystack. `sentences`: an iterator (generated) or a list (a file's text)."""
    overhead = _n_tokens(tokenizer, render(tokenizer, "", needle.question, template)) + _n_tokens(tokenizer, needle.needle) + 1
    budget = length - overhead
    if budget <= 0:
        raise ValueError(f"a context of {length} tokens cannot hold the template, question and needle ({overhead} tokens)")
    hay, used = [], 0
    source = iter(sentences)
    for s in source:
        n = _n_tokens(tokenizer, " " + s)
        if used + n > budget:
            break
        hay.append(s)
        used += n
    else:
        if isinstance(sentences, list):
            raise ValueError(f"the haystack has only {used} tokens; {budget} are needed for a {length}-token context")
    cut, acc = 0, 0  # the sentence break at or before depth% of the haystack's tokens
    target = used * depth / 100
    for i, s in enumerate(hay):
        n = _n_tokens(tokenizer, " " + s)
        if acc + n > target:
            break
        acc += n
        cut = i + 1
    context = " ".join(hay[:cut] + [needle.needle] + hay[cut:])
    return render(tokenizer, context, needle.question, template)


def find_span(prompt_ids: torch.Tensor, answer_ids: list[int]) -> tuple[int, int] | None:
    """The reference code's needle search: the first window of len(answer) prompt tokens whose token-id set
    overlaps the answer's by more than 0.9. (start, end) or None."""
    span, want = len(answer_ids), set(answer_ids)
    ids = prompt_ids.tolist()
    for i in range(len(ids)):
        got = set(ids[i:i + span])
        if len(got & want) / len(want) > 0.9:
            return i, i + span
    return None


def locate_answer(tokenizer, prompt_ids: torch.Tensor, answer: str) -> tuple[int, int]:
    """The answer's span in the prompt: tokenized alone and, for tokenizers that mark word starts (GPT-2 style
    BPE), after a space, as it appears mid-sentence. Raises a clear error when neither is found."""
    for text in (answer, " " + answer):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        found = find_span(prompt_ids, ids) if ids else None
        if found is not None:
            return found
    raise ValueError(f"the needle's answer {answer!r} cannot be found in the prompt's tokens: the tokenizer splits "
                     "it differently in context; choose another needle")
