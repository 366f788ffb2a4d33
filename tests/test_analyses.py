"""Every registered analysis is complete: typed parameters with help, a view that draws its runs, and docs."""

import re
from pathlib import Path

import plotly.graph_objects as go
import pytest

from interp.analyses import ANALYSES
from interp.app.figures import Note
from interp.params import Params, Spec
from interp.results import open_run

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_analysis_declares_typed_documented_parameters():
    for name, analysis in ANALYSES.items():
        assert issubclass(analysis.Params, Params) and analysis.Params is not Params, name
        assert analysis.Params.analysis == name, name
        for param, (spec, kind, default) in analysis.Params.specs().items():
            assert isinstance(spec, Spec) and len(spec.help) > 10, (name, param)
            assert analysis.resolve({})[param] == analysis.params[param], (name, param)


def test_a_name_several_analyses_declare_means_one_thing():
    """It is one CLI flag feeding every selected analysis that takes it: one spec and one type."""
    seen = {}
    for name, analysis in ANALYSES.items():
        for param, (spec, kind, _) in analysis.Params.specs().items():
            first = seen.setdefault(param, (name, spec, kind))
            assert (spec, kind) == first[1:], f"{param}: {first[0]} and {name} declare it differently"


def test_every_analysis_is_documented():
    for name, analysis in ANALYSES.items():
        assert analysis.description and analysis.kinds, name
        assert re.search(rf"^\| `{name}` \|", README, re.M), f"README's table of analyses has no row for {name}"
        assert type(analysis).__module__ and __import__(type(analysis).__module__, fromlist=["_"]).__doc__, name


def test_every_analysis_view_draws_a_real_run(app_store):
    store, ids, _ = app_store
    drawn = set()
    for kind, run_id in ids.items():
        if kind in ("incomplete", "corrupt"):
            continue
        result = open_run(run_id, store)
        items = result.view()
        assert items and all(isinstance(i, (go.Figure, Note)) for i in items), kind
        for fig in (i for i in items if isinstance(i, go.Figure)):
            assert fig.data, f"{kind}: an empty figure in the view"
        drawn.add(result.analysis)
    assert {"summary", "retrieval", "sinks", "circuits"} <= drawn


def test_a_renamed_parameter_reads_under_its_old_name():
    """circuits' `threshold` is `circuit_threshold` now: old runs' stored parameters and old calls still work."""
    circuits = ANALYSES["circuits"]
    assert circuits.resolve({"threshold": 0.5})["circuit_threshold"] == 0.5
    old = {**circuits.params, "threshold": 0.25}
    del old["circuit_threshold"]
    assert circuits.Params.upgrade(old) == {**circuits.params, "circuit_threshold": 0.25}


def test_parameters_are_checked_where_they_are_declared():
    retrieval = ANALYSES["retrieval"]
    assert retrieval.resolve({"lengths": "100,200", "depths": [25]})["lengths"] == [100, 200]
    for bad, message in (({"depths": [150]}, "outside 0..100"), ({"lengths": "a,b"}, "not an integer|invalid literal"),
                         ({"score_rule": "x"}, "unknown retrieval score_rule"), ({"mask_prefill": "yes"}, "true or false"),
                         ({"nope": 1}, "has no parameter nope")):
        with pytest.raises(ValueError, match=message):
            retrieval.resolve(bad)


def test_old_runs_parameters_match_as_today_resolves_them(tmp_path, monkeypatch):
    """`--resume` and sweeps find runs written before a parameter was renamed or made absolute."""
    from interp.scoring import _params_of

    circuits = ANALYSES["circuits"]
    old = {k: v for k, v in circuits.params.items() if k != "circuit_threshold"} | {"threshold": 0.5}
    assert _params_of({"analysis": "circuits", "params": old}) == circuits.resolve({"circuit_threshold": 0.5})
    monkeypatch.chdir(tmp_path)
    relative = ANALYSES["retrieval"].params | {"needles": "needles.jsonl"}
    assert _params_of({"analysis": "retrieval", "params": relative})["needles"] == str(tmp_path / "needles.jsonl")
