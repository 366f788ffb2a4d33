"""Analysis parameters, declared once: a frozen dataclass per analysis whose fields are `param(...)`s.

A field's type annotation (int, float, str, bool, list[int], ... or `X | None`), default, help, choices, bounds
and whether it names a user file live in one place; from them come the checks of `Analysis.resolve`, the CLI's
flag group of the analysis (`interp score --help`), and the parameters a run stores in `meta.json` (JSON values:
lists, not tuples; user files as absolute paths). A name several analyses declare is one CLI flag, so it must
mean the same thing in each: the same type and `Spec` (the defaults may differ); `tests/test_analyses.py` checks it.
A parameter renamed since older runs were written names its old key in `was`, and old runs still resume.

    @dataclass(frozen=True)
    class CountParams(Params):
        min_count: int = param(2, "keep tokens seen at least N times", metavar="N", low=1)
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar


NOT_GIVEN = object()  # Spec.before of a parameter whose default is what older runs did


@dataclass(frozen=True)
class Spec:
    """What a parameter means and accepts, beside its type and default.

    help: one line for `--help` (the default is appended). metavar: the CLI's placeholder. choices: the allowed
    values (each item of a list). low / high: bounds on a number (each item of a list). path: the value (each item
    of a list) names a user file or folder, stored absolute so that a run resumed elsewhere matches; only such a
    parameter is ever read, hashed or kept as a file. builtin: the names a path parameter takes as built-in inputs,
    not files (circuits' `ioi`). was: the key older runs stored. before: what runs written before the parameter
    existed did, where that is not its default.
    """

    help: str
    metavar: str | None = None
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    path: bool = False
    builtin: tuple = ()
    was: str | None = None
    before: Any = NOT_GIVEN


def param(default: Any, help: str | Spec, **spec) -> Any:
    """A parameter field: its default (a tuple stands for a list) and its `Spec` (or one shared by several
    analyses, below)."""
    return field(default=default, metadata={"spec": help if isinstance(help, Spec) else Spec(help, **spec)})


# Parameters several analyses take, one meaning each (each analysis chooses its own default).
IMAGES = Spec("an image file or folder (default: the built-in scenes)", metavar="PATH", path=True)
PROMPTS = Spec("prompts file, one per line (or .jsonl with \"text\")", metavar="FILE", path=True)
PROMPT = Spec("the question asked about each image (vision-language models)", metavar="TEXT")
MAX_NEW_TOKENS = Spec("longest answer in tokens", metavar="N", low=1)
BATCH = Spec("inputs per sample (one forward pass)", metavar="N", low=1)
CLS_RULE = Spec("how attention to the CLS token is treated: renormalize (the ViT paper) or zero", metavar="RULE",
                choices=("renormalize", "zero"))


@dataclass(frozen=True)
class Params:
    """Base of every analysis's parameters. Subclasses add `param` fields and may check several fields together
    in `__post_init__` (raise ValueError)."""

    analysis: ClassVar[str] = "analysis"

    @classmethod
    def specs(cls) -> dict[str, tuple[Spec, Any, Any]]:
        """name -> (spec, type, default), in declaration order."""
        return _specs(cls)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The default of every parameter, as JSON values."""
        return {name: _json(default) for name, (_, _, default) in cls.specs().items()}

    @classmethod
    def resolve(cls, given: dict) -> dict:
        """The full, checked parameter set as JSON values: defaults overridden by `given` (old names accepted),
        each value coerced to its type and checked; ValueError naming the parameter otherwise."""
        specs = cls.specs()
        renamed = {spec.was: name for name, (spec, _, _) in specs.items() if spec.was}
        given = {renamed.get(key, key): value for key, value in given.items()}
        unknown = sorted(set(given) - set(specs))
        if unknown:
            raise ValueError(f"analysis {cls.analysis!r} has no parameter {', '.join(unknown)} "
                             f"(it has: {', '.join(specs) or 'none'})")
        values = {}
        for name, (spec, kind, default) in specs.items():
            value = given.get(name, default)
            if spec.path and optional(kind) and isinstance(value, str) and value == "":
                value = None  # `--images ""`: no file, the built-ins
            if value is None and not optional(kind):
                raise ValueError(f"{cls.analysis} parameter {name}: give a value (it cannot be None)")
            values[name] = None if value is None else _check(cls.analysis, name, spec, kind, value)
        return _json(cls(**values).__dict__)

    @classmethod
    def upgrade(cls, stored: dict) -> dict:
        """A run's stored parameters under today's names (older runs stored some under the names in `was`)."""
        renamed = {spec.was: name for name, (spec, _, _) in cls.specs().items() if spec.was}
        return {renamed.get(key, key): value for key, value in stored.items()}

    @classmethod
    def read(cls, stored: dict) -> dict:
        """A run's stored parameters as today's analysis reads them: old names upgraded, and a parameter declared
        since the run was written at what such runs did (its `before`, else its default)."""
        missing = {name: _json(default if spec.before is NOT_GIVEN else spec.before)
                   for name, (spec, _, default) in cls.specs().items()}
        return {**missing, **cls.upgrade(stored)}


@cache
def _specs(cls: type) -> dict[str, tuple[Spec, Any, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f.metadata["spec"], hints[f.name], f.default) for f in fields(cls) if "spec" in f.metadata}


def optional(kind: Any) -> bool:
    """Whether an annotation takes None (`X | None`)."""
    return type(None) in typing.get_args(kind)


def base_type(kind: Any) -> tuple[type, type | None]:
    """(scalar type, list item type or None) of an annotation, None removed: `list[int] | None` -> (list, int)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        kind = args[0]
        args = list(typing.get_args(kind))
    if typing.get_origin(kind) is list:
        return list, args[0]
    return kind, None


def parse(kind: Any, value: Any) -> Any:
    """`value` (a Python value, or the text of a CLI flag) as the annotation `kind` asks; ValueError otherwise.
    A list parameter takes a non-empty list, one value, or comma-separated text; a text parameter given a list takes
    its items comma-separated. Numbers are finite; integers fit in 64 bits."""
    scalar, item = base_type(kind)
    if scalar is list:
        items = (value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple))
                 else [value])
        out = [parse(item, v.strip() if isinstance(v, str) else v) for v in items
               if not (isinstance(v, str) and not v.strip())]
        if not out:
            raise ValueError("give at least one value")
        return out
    if scalar is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{_short(value)} is not true or false")
    if scalar is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float, str))
                or isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{_short(value)} is not an integer")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{_short(value)} is not an integer") from None
        if abs(number) >= 1 << 63:
            raise ValueError(f"{_short(value)} is too large")
        return number
    if scalar is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{_short(value)} is not a number")
        try:
            number = value if isinstance(value, int) else float(value)  # an int is a float (PEP 484): 25 stays 25
            finite = math.isfinite(number)
        except (ValueError, OverflowError):
            raise ValueError(f"{_short(value)} is not a finite number") from None
        if not finite:
            raise ValueError(f"{_short(value)} is not a finite number")
        return number
    if scalar is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value):
            return ",".join(str(v) for v in value)
        if not isinstance(value, (str, Path)):
            raise ValueError(f"{_short(value)} is not text")
        return str(value)
    raise TypeError(f"unsupported parameter type {kind!r}")


def _short(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut to one short line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def named_paths(spec: Spec, value: Any) -> list[str]:
    """The user files or folders a resolved parameter value names: a path parameter's value, or each item of a list
    one that is not a built-in name; none for any other parameter, whatever its text."""
    if not spec.path or value is None:
        return []
    return [v for v in (value if isinstance(value, list) else [value]) if v not in spec.builtin]


def _check(analysis: str, name: str, spec: Spec, kind: Any, value: Any) -> Any:
    try:
        value = parse(kind, value)
    except ValueError as e:
        raise ValueError(f"{analysis} parameter {name}: {e}") from None
    items = value if isinstance(value, list) else [value]
    for v in items:
        if spec.choices and v not in spec.choices:
            raise ValueError(f"unknown {analysis} {name} {_short(v)}; choose from {', '.join(map(str, spec.choices))}")
        if spec.low is not None and v < spec.low or spec.high is not None and v > spec.high:
            bounds = f"{spec.low if spec.low is not None else '-∞'}..{spec.high if spec.high is not None else '∞'}"
            raise ValueError(f"{analysis} parameter {name}: {v} is outside {bounds}")
    if spec.path:
        try:
            absolute = {v: str(Path(v).expanduser().resolve()) for v in named_paths(spec, value)}
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, an unknown ~user
            raise ValueError(f"{analysis} parameter {name}: not a path ({e})") from None
        value = [absolute.get(v, v) for v in value] if isinstance(value, list) else absolute[value]
    return value


def _json(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_text(spec: Spec, defaults: dict[str, Any]) -> str:
    """A flag's help: the spec's line, then its default (or each analysis's, where they differ)."""
    shown = {a: d for a, d in defaults.items() if d is not None and d is not False}
    values = {_shown(d) for d in shown.values()}
    text = ("" if not shown else f" (default {values.pop()})" if len(values) == 1 and len(shown) == len(defaults) else
            " (default " + "; ".join(f"{a} {_shown(d)}" for a, d in shown.items()) + ")")
    return (spec.help + text).replace("%", "%%")  # argparse formats help with %


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

