"""Every declared parameter of every analysis (found from their Params dataclasses, so a new one is covered), given
bad values (the wrong type, NaN, ±inf, empty, huge, unicode) from Python (`interp.score`) and from the command line
(`interp score ... --flag=TEXT`): a value wrong for its type is refused with one line naming the parameter, before
the plan (no forward pass); a value some parameter may legitimately take (free text) is refused so or accepted,
never anything else (issue 28)."""

import math
import subprocess
import sys

import pytest

import interp
import interp.cli
import interp.models
from interp.analyses import ANALYSES
from interp.params import base_type, cli_flag, optional

HUGE_TEXT = "x" * 5000


class Reached(Exception):
    """The analysis's plan was called: the parameters passed every check."""


def _reached(self, *args, **kwargs):
    raise Reached("reached the plan")


@pytest.fixture(scope="module")
def models():
    """A model each analysis applies to, by analysis name."""
    from tiny_models import llava_with_processor, make, vit_processor

    hf, processor = llava_with_processor(n_layers=2)
    candidates = [interp.load_model("stories260k"), interp.load_model(make("vit")[0], processor=vit_processor()),
                  interp.load_model(hf, processor=processor)]
    return {a.name: next(m for m in candidates if m.family.kind in a.kinds) for a in ANALYSES.values()}


@pytest.fixture
def no_plan(monkeypatch):
    for a in ANALYSES.values():
        monkeypatch.setattr(type(a), "plan", _reached)


def parameters():
    """(analysis, name, spec, annotation) of every declared parameter."""
    return [(a.name, name, spec, kind) for a in ANALYSES.values()
            for name, (spec, kind, _) in a.Params.specs().items()]


def python_values(spec, kind) -> list[tuple[object, bool]]:
    """(value, whether it must be refused) for a parameter of this spec and annotation."""
    scalar, item = base_type(kind)
    wrong = [({"a": 1}, True), (object(), True), (b"bytes", True)]
    if scalar is bool:
        return wrong + [("yes", True), (1, True), (math.nan, True), (None, not optional(kind))]
    if scalar in (int, float):
        return wrong + [("abc", True), ("", True), (math.nan, True), (math.inf, True), (-math.inf, True),
                        ([1], True), (True, True), ("é∞", True), (10 ** 30, scalar is int), (HUGE_TEXT, True),
                        (None, not optional(kind))] + [(1.5, True)] * (scalar is int)
    if scalar is list:
        numeric = item in (int, float)
        return wrong + [("", True), ([], True), (",", True), ([math.nan], numeric), ([math.inf], numeric),
                        (["abc"], numeric or bool(spec.choices)), ([[1]], True), ([True], True),
                        (["é∞"], numeric or bool(spec.choices) or spec.path), (10 ** 30, numeric)]
    # text
    free = not spec.choices and not spec.path
    return wrong + [(5, True), (math.nan, True), (["é", {}], True), ("", bool(spec.choices)),
                    ("é∞\u202e", not free), (HUGE_TEXT, not free), ("/nonexistent/é∞", not free),
                    ("a\0b", spec.path), (None, not optional(kind))]


def cli_values(spec, kind) -> list[tuple[str, bool]]:
    """(flag text, whether it must be refused)."""
    scalar, item = base_type(kind)
    if scalar is bool:
        return [("x", True), ("", True)]
    if scalar in (int, float) or item in (int, float):
        return [(text, True) for text in ("", ",", "abc", "nan", "inf", "-inf", "1e999", "é∞", "1" * 40, HUGE_TEXT)
                if not (text == "1" * 40 and float in (scalar, item))] + [("1.5", scalar is int or item is int)]
    free = not spec.choices and not spec.path
    return [("", bool(spec.choices) or scalar is list), ("é∞", not free), (HUGE_TEXT, not free),
            ("/nonexistent/é∞", not free)]


def _refusal(text: str, name: str, where: str) -> None:
    assert "Traceback" not in text and "\n" not in text.strip(), f"{where}: not one line: {text!r}"
    assert name in text or cli_flag(name) in text, f"{where}: the error does not name {name}: {text!r}"


def test_python_refuses_bad_values_in_one_line_naming_the_parameter(models, no_plan):
    checked = 0
    for analysis, name, spec, kind in parameters():
        for value, must_fail in python_values(spec, kind):
            where = f"interp.score(..., {analysis!r}, {name}={str(value)[:40]!r})"
            try:
                interp.score(models[analysis], analysis, **{name: value})
            except Reached:
                assert not must_fail, f"{where}: accepted"
                continue
            except ValueError as e:
                _refusal(str(e), name, where)
                checked += 1
                continue
            except Exception as e:  # noqa: BLE001 - any other type is the failure this test looks for
                pytest.fail(f"{where}: {type(e).__name__}: {e}")
            pytest.fail(f"{where}: neither refused nor planned")
    assert checked > 300


def test_the_cli_refuses_bad_values_in_one_line_naming_the_flag(models, no_plan, monkeypatch, capsys, tmp_path):
    by_name = {m.name: m for m in models.values()}
    monkeypatch.setattr(interp.models, "load_model", lambda name, **kwargs: by_name[name])
    checked = 0
    for analysis, name, spec, kind in parameters():
        for text, must_fail in cli_values(spec, kind):
            argv = ["score", models[analysis].name, "-a", analysis, f"{cli_flag(name)}={text}", "--out", str(tmp_path)]
            where = f"interp {' '.join(argv)[:120]}"
            try:
                code = interp.cli.main(argv)
            except SystemExit as e:
                code = e.code
            err = capsys.readouterr().err
            if "Reached" in err:
                assert not must_fail, f"{where}: accepted"
                continue
            assert code in (1, 2), f"{where}: exit {code}: {err}"
            last = err.strip().splitlines()[-1]
            assert "error" in last, f"{where}: {err}"
            _refusal(last, name, where)
            assert "Traceback" not in err and "TypeError" not in err, f"{where}: {err}"
            checked += 1
    assert checked > 150


@pytest.mark.parametrize("analysis, given, message", [
    ("lookback", dict(offset=[1]), "lookback parameter offset: [1] is not an integer"),
    ("retrieval", dict(threshold=math.inf), "retrieval parameter threshold: inf is not a finite number"),
    ("sinks", dict(epsilon=math.inf), "sinks parameter epsilon: inf is not a finite number"),
    ("sinks", dict(tau=-math.inf), "sinks parameter tau: -inf is not a finite number"),
    ("sinks", dict(massive_min=math.inf), "sinks parameter massive_min: inf is not a finite number"),
    ("retrieval", dict(depths=[]), "retrieval parameter depths: give at least one value"),
])
def test_the_reported_values_are_refused(models, analysis, given, message):
    with pytest.raises(ValueError) as e:
        interp.score(models[analysis], analysis, **given)
    assert str(e.value) == message


def test_an_empty_list_flag_is_a_usage_error_on_the_command_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "interp.cli", "score", "stories260k", "-a", "retrieval", "--depths=",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "argument --depths: '': give at least one value" in done.stderr.splitlines()[-1]
    assert "Traceback" not in done.stderr
