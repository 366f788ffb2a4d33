"""The inputs analyses share: user files (prompts; within a run, each read checked against what the run recorded), the
built-in data (texts, needles, task word lists, under `interp/data/inputs/`), prompt templates, special tokens, and
greedy decoding.

Data lives in files beside the code, not in it: `texts.json` (sixteen natural texts, written for interp, public
domain), `needles.jsonl` (the retrieval needles, in the format `--needles` reads), `filler.json` (the haystack's
sentence parts), `tasks.json` (the circuits tasks' names, places, objects and IOI templates).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from interp.files import MB, read_bytes
from interp.hooks import generate
from interp.models import Model

DATA = Path(str(files("interp"))) / "data" / "inputs"


def builtin_data(name: str) -> Any:
    """A built-in data file of `interp/data/inputs` (JSON)."""
    return json.loads((DATA / name).read_text(encoding="utf-8"))


TEXTS: tuple[str, ...] = tuple(builtin_data("texts.json"))


def chosen_prompts(n_prompts: int, n: int, seed: int) -> list[int]:
    """The prompts (indices, in order) that a run of `n` samples reads out of `n_prompts`: all of them when n is
    n_prompts, else a random choice seeded by the run's seed. summary, lookback and sinks' natural texts choose alike,
    so runs with the same seed read the same prompts (and share their forward passes: `interp.score_together`)."""
    return sorted(random.Random(seed).sample(range(n_prompts), n)) if n < n_prompts else list(range(n))


# ---- user files

USER_FILE_LIMIT = 256 * MB


class InputChangedError(ValueError):
    """A user file differs from what the run recorded at its start (edited or replaced meanwhile)."""


_recorded: ContextVar[dict[str, str] | None] = ContextVar("recorded_inputs", default=None)


@contextmanager
def recorded_inputs(digests: dict[str, str]) -> Iterator[None]:
    """Within the block (a run), every user file read is checked against `digests` ({path: `file_digest`}, as
    recorded when the run started); a file not among them is recorded at its first read. A file that changed fails
    the read with InputChangedError, so a run never scores a mix of two versions."""
    token = _recorded.set({os.path.realpath(os.path.expanduser(p)): d for p, d in digests.items()})
    try:
        yield
    finally:
        _recorded.reset(token)


def file_digest(name: str, data: bytes) -> str:
    """What a run records of an input file: sha256 of its name, a NUL byte and its bytes."""
    return hashlib.sha256(name.encode() + b"\0" + data).hexdigest()


def read_user_bytes(path: str | Path, what: str) -> bytes:
    """The bytes of a file the user named (prompts, haystack, needles, tasks, an image), with a clear error when it
    cannot be read (a FIFO, a device or a file over USER_FILE_LIMIT bytes included), checked inside
    `recorded_inputs`."""
    path = Path(path).expanduser()
    try:
        data = read_bytes(path, USER_FILE_LIMIT)
    except OSError as e:
        raise ValueError(f"cannot read {what} from {path}: {e.strerror or e}") from e
    recorded = _recorded.get()
    if recorded is not None:
        real = os.path.realpath(path)
        digest = file_digest(os.path.basename(real), data)
        if recorded.setdefault(real, digest) != digest:
            raise InputChangedError(f"{what} {path} changed since the run started (its sha256 is not the one "
                                    "recorded): the run stops rather than mix two versions; restore the file, or "
                                    "start a new run")
    return data


def read_user_file(path: str | Path, what: str) -> str:
    """The text (UTF-8) of a file the user named, read as `read_user_bytes` does."""
    try:
        return read_user_bytes(path, what).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {what} from {path}: not UTF-8 text ({e})") from e


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: JSON lines with a "text" field (`.jsonl`), else one prompt per non-empty line."""
    path = Path(path).expanduser()
    lines = [line for line in read_user_file(path, "prompts").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(lines, 1):
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}, line {n}: not JSON ({e})") from e
            text = obj.get("text") if isinstance(obj, dict) else obj
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}, line {n}: expected an object with a non-empty \"text\" string")
            texts.append(text)
        lines = texts
    if not lines:
        raise ValueError(f"{path} holds no prompts")
    return lines


# ---- prompt templates and special tokens

# The prompt for models without a chat template (the reference code's wording, without its special tokens).
BASE_TEMPLATE = ("This is a very long story book: <book> {context} </book>.\n"
                 "Based on the content of the book, Question: {question}\nAnswer:")

CHAT_MESSAGE = "This is a very long story book: <book> {context} </book>.\nBased on the content of the book, answer the question: {question}"


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (BOS; [CLS] … [SEP])."""
    plain = tokenizer("a b c", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b c")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def plain_token_pool(tokenizer) -> list[int]:
    """Every token id that is not a special token (for random-token inputs)."""
    special = set(tokenizer.all_special_ids)
    return [i for i in range(len(tokenizer)) if i not in special]


def lvlm_prompt(model: Model, prompt: str, image: bool = True) -> str:
    """The prompt with one image (or none), through the processor's chat template when it has one."""
    proc = model.processor
    if getattr(proc, "chat_template", None):
        content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
        return proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    token = getattr(proc, "image_token", None) or "<image>"
    return f"{token}\n{prompt}" if image else prompt


# ---- greedy decoding

class _StopAtNewline(StoppingCriteria):
    """Stops greedy decoding once the last generated token contains a newline (batch of one)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([ends_line(self.tokenizer, int(input_ids[0, -1]))], device=input_ids.device)


def ends_line(tokenizer, token: int) -> bool:
    return "\n" in tokenizer.decode([token])


def eos_ids(model: Model) -> set[int]:
    eos = getattr(model.hf.generation_config, "eos_token_id", None)
    if eos is None:
        eos = model.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def greedy(model: Model, inputs: dict, max_new_tokens: int, probe=None, *, backend: str = "hf",
           layers=None, heads=None) -> torch.Tensor:
    """The generated token ids (T,), greedy with a KV cache, stopping after a newline or end of sequence; with a
    probe, each step's attention calls stream to it (step t produces generated token t)."""
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=StoppingCriteriaList(
        [_StopAtNewline(model.tokenizer)]), pad_token_id=model.tokenizer.pad_token_id or model.tokenizer.eos_token_id)
    n = inputs["input_ids"].shape[-1]
    if probe is None:
        model.check_length(n + max_new_tokens)
        with torch.no_grad():
            out = model.hf.generate(**inputs, **kwargs)
    else:
        out = generate(model, inputs, probe, backend=backend, layers=layers, heads=heads, **kwargs)
    return out[0, n:].cpu()
