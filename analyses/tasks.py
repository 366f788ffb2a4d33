"""Circuit tasks as data: clean and corrupted prompts with a correct and a foil answer token, built with the model's
own tokenizer.

Built in: IOI (Wang et al. 2022; corruption "abc": three other names, or "swap": the IO name at S2, as Merullo et
al.) and Colored Objects (Merullo et al.: 1-shot, 3 objects; the corrupted prompt asks about another object of the
same scene, whose colour is the foil). A user task is a JSONL file of {"clean", "corrupt", "correct", "foil"}
(optional "group": prompts whose positions line up, for per-position results and position-wise means).
Names, objects and colours are used only where the tokenizer keeps them one token after a space, so a clean
prompt and its corruption have the same length, every prompt of a template has its words at the same positions,
and each answer is one token.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from interp.models import Model

from .inputs import builtin_data, read_user_file

BUILTIN_TASKS = ("ioi", "colored-objects")
IOI_CORRUPTIONS = ("abc", "swap")

_WORDS = builtin_data("tasks.json")
NAMES, PLACES, THINGS = _WORDS["names"], _WORDS["places"], _WORDS["things"]
IOI_TEMPLATES = _WORDS["ioi_templates"]  # {A}, {B}: the first clause's names; {S}: who gives; the IO: the other one
COLORS, OBJECTS, SURFACES = _WORDS["colors"], _WORDS["objects"], _WORDS["surfaces"]


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt pair: `clean` / `corrupt` texts (same token length), `correct` / `foil` answers (one token each,
    with their leading space), and `group` (prompts of one group have their positions aligned)."""

    clean: str
    corrupt: str
    correct: str
    foil: str
    group: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def task_label(task: str) -> str:
    """The name a task's score columns start with: the built-in name, or the JSONL file's stem; `_` for `-`."""
    name = task if task in BUILTIN_TASKS else Path(task).stem
    return "".join(c if c.isalnum() else "_" for c in name)


def single_tokens(model: Model, words, context: str) -> list[str]:
    """The words the tokenizer keeps as one token after `context` and a space."""
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"{model.name} has no tokenizer: circuit tasks are built with the model's tokenizer")
    base = len(tok(context)["input_ids"])
    return [w for w in words if len(tok(f"{context} {w}")["input_ids"]) == base + 1]


def _pool(model: Model, words, context: str, need: int, what: str, task: str) -> list[str]:
    pool = single_tokens(model, words, context)
    if len(pool) < need:
        raise ValueError(f"task {task!r} needs at least {need} {what} that {model.name}'s tokenizer keeps as one token; "
                         f"only {len(pool)} of {len(words)} qualify ({', '.join(pool) or 'none'})")
    return pool


def ioi_prompts(model: Model, n: int, seed: int = 0, corruption: str = "abc") -> list[TaskPrompt]:
    """n IOI prompts, spread over the templates (group = template). Clean: "When Mary and John went to the store,
    John gave a drink to" → " Mary" (IO), foil " John" (S). corruption "abc": S1, IO and S2 replaced by three other
    names (Wang et al.'s ABC distribution); "swap": the IO name at S2, so the foil becomes the right answer."""
    if corruption not in IOI_CORRUPTIONS:
        raise ValueError(f"unknown IOI corruption {corruption!r}; choose from {', '.join(IOI_CORRUPTIONS)}")
    names = _pool(model, NAMES, "When", 5, "names", "ioi")
    places = _pool(model, PLACES, "the", 1, "places", "ioi")
    things = _pool(model, THINGS, "a", 1, "objects", "ioi")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        t = i % len(IOI_TEMPLATES)
        io, s, x, y, z = rng.sample(names, 5)
        place, thing = rng.choice(places), rng.choice(things)
        first = (io, s) if rng.random() < 0.5 else (s, io)
        fill = dict(place=place, thing=thing)
        clean = IOI_TEMPLATES[t].format(A=first[0], B=first[1], S=s, **fill)
        if corruption == "abc":
            a, b = (x, y) if first[0] == io else (y, x)  # IO -> x, S1 -> y, S2 -> z
            corrupt = IOI_TEMPLATES[t].format(A=a, B=b, S=z, **fill)
        else:
            corrupt = IOI_TEMPLATES[t].format(A=first[0], B=first[1], S=io, **fill)
        out.append(TaskPrompt(clean, corrupt, f" {io}", f" {s}", f"ioi-{t}"))
    return out


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _scene(rng: random.Random, surfaces, colors, objects) -> tuple[str, list[str], list[str]]:
    surface = rng.choice(surfaces)
    objs, cols = rng.sample(objects, 3), rng.sample(colors, 3)
    items = [f"{_article(c)} {c} {o}" for c, o in zip(cols, objs)]
    return f"On the {surface}, I see {items[0]}, {items[1]}, and {items[2]}.", objs, cols


def colored_objects_prompts(model: Model, n: int, seed: int = 0) -> list[TaskPrompt]:
    """n Colored Objects prompts (Merullo et al.): one solved example, then a new scene of three coloured objects
    and a question about one of them → its colour, capitalised (" Blue"). The corrupted prompt asks about another
    object of the same scene; the foil is that object's colour."""
    objects = _pool(model, OBJECTS, "the", 3, "objects", "colored-objects")
    answers = {c.lower() for c in _pool(model, [c.capitalize() for c in COLORS], "A:", 3, "colours", "colored-objects")}
    colors = [c for c in _pool(model, COLORS, "a", 3, "colours", "colored-objects") if c in answers]
    if len(colors) < 3:
        raise ValueError(f"task 'colored-objects' needs at least 3 colours that {model.name}'s tokenizer keeps as one "
                         f"token both in a scene and capitalised as the answer; only {len(colors)} qualify")
    surfaces = _pool(model, SURFACES, "the", 1, "surfaces", "colored-objects")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene, objs, cols = _scene(rng, surfaces, colors, objects)
        k = rng.randrange(3)
        shot = f"Q: {scene} What color is the {objs[k]}?\nA: {cols[k].capitalize()}\n"
        scene, objs, cols = _scene(rng, surfaces, colors, objects)
        ask, other = rng.sample(range(3), 2)
        question = "Q: {} What color is the {}?\nA:"
        out.append(TaskPrompt(shot + question.format(scene, objs[ask]), shot + question.format(scene, objs[other]),
                              f" {cols[ask].capitalize()}", f" {cols[other].capitalize()}", "colored-objects"))
    return out


def jsonl_prompts(path: str | Path, n: int | None = None, seed: int = 0) -> list[TaskPrompt]:
    """A user task: JSON lines {"clean", "corrupt", "correct", "foil"[, "group"]} (n: a seeded random subset)."""
    path = Path(path).expanduser()
    lines = read_user_file(path, "the task file").splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out.append(TaskPrompt(str(row["clean"]), str(row["corrupt"]), str(row["correct"]), str(row["foil"]),
                                  str(row.get("group", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i}: expected a JSON object with \"clean\", \"corrupt\", \"correct\" and "
                             f"\"foil\" ({type(e).__name__}: {e})") from e
    if not out:
        raise ValueError(f"the task file {path} has no prompts")
    if n is not None and n < len(out):
        out = random.Random(seed).sample(out, n)
    return out


def task_prompts(model: Model, task: str, n: int, seed: int = 0, ioi_corruption: str = "abc") -> list[TaskPrompt]:
    """The prompts of a built-in task ("ioi", "colored-objects"), else of the JSONL file at the path `task`."""
    if task == "ioi":
        return ioi_prompts(model, n, seed, ioi_corruption)
    if task == "colored-objects":
        return colored_objects_prompts(model, n, seed)
    return jsonl_prompts(task, n, seed)


@dataclass(frozen=True)
class Encoded:
    """A task's prompts as token ids: clean / corrupt (n, N) lists of equal length per prompt, correct / foil ids."""

    clean: list[list[int]]
    corrupt: list[list[int]]
    correct: list[int]
    foil: list[int]


def encode(model: Model, prompts: list[TaskPrompt], task: str) -> Encoded:
    """Token ids of the prompts, checked: each corruption as long as its clean prompt, each answer one token that
    the tokenizer produces after the prompt. A clear error names the first prompt that fails."""
    tok = model.tokenizer
    clean, corrupt, correct, foil = [], [], [], []
    for i, p in enumerate(prompts):
        a, b = tok(p.clean)["input_ids"], tok(p.corrupt)["input_ids"]
        if len(a) != len(b):
            raise ValueError(f"task {task!r}, prompt {i}: the clean prompt is {len(a)} tokens and its corruption "
                             f"{len(b)}; patching needs them the same length ({p.clean!r} / {p.corrupt!r})")
        answers = []
        for answer in (p.correct, p.foil):
            ids = tok(p.clean + answer)["input_ids"]
            if len(ids) != len(a) + 1 or ids[:-1] != a:
                raise ValueError(f"task {task!r}, prompt {i}: the answer {answer!r} is not one token after the prompt "
                                 f"for {model.name}'s tokenizer (answers need their leading space, e.g. ' Mary')")
            answers.append(ids[-1])
        if answers[0] == answers[1]:
            raise ValueError(f"task {task!r}, prompt {i}: the correct and foil answers are the same token ({p.correct!r})")
        model.check_length(len(a))
        clean.append(a)
        corrupt.append(b)
        correct.append(answers[0])
        foil.append(answers[1])
    return Encoded(clean, corrupt, correct, foil)
