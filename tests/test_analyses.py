"""Every registered analysis is complete: typed parameters with help, a view that draws its runs, and docs."""

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import plotly.graph_objects as go
import pytest

import interp
from interp.analyses import ANALYSES, get_analysis
from interp.app.figures import Note
from interp.cli import _parameter_flags
from interp.params import Params, Spec, param
from interp.results import open_run
from tiny_models import llava_with_processor, make, vit_processor

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


def test_a_flag_declared_differently_by_two_analyses_is_refused():
    first, second = (type(name, (Params,), {"__annotations__": {"depth": kind}, "depth": param(1, text),
                                            "analysis": name}) for name, kind, text in
                     (("a", int, "tokens deep into the text"), ("b", float, "percent of the context")))
    analyses = {p.analysis: SimpleNamespace(name=p.analysis, Params=dataclass(frozen=True)(p)) for p in (first, second)}
    with pytest.raises(TypeError, match="parameter 'depth' means different things in a and b"):
        _parameter_flags(argparse.ArgumentParser(), analyses)


def test_every_analysis_is_documented():
    for name, analysis in ANALYSES.items():
        assert analysis.description and analysis.kinds, name
        assert re.search(rf"^\| `{name}` \|", README, re.M), f"README's table of analyses has no row for {name}"
        assert type(analysis).__module__ and __import__(type(analysis).__module__, fromlist=["_"]).__doc__, name


def _drawn(result) -> str:
    """The analysis of `result`, after checking that its view draws it: figures with data and notes, nothing else."""
    items = get_analysis(result.analysis).view(result)
    assert items and all(isinstance(i, (go.Figure, Note)) for i in items), result.analysis
    for fig in (i for i in items if isinstance(i, go.Figure)):
        assert fig.data, f"{result.analysis}: an empty figure in the view"
    return result.analysis


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """Stored runs of the analyses the dashboard's store has none of, each as small as it goes."""
    store = tmp_path_factory.mktemp("views")
    llava_hf, llava_processor = llava_with_processor(n_layers=2)
    llava = interp.load_model(llava_hf, processor=llava_processor)
    vit_hf, _ = make("vit")
    vit = interp.load_model(vit_hf, processor=vit_processor())
    runs = [interp.score("stories260k", "taxonomy", samples=2, store=store),
            interp.score("stories260k", "lookback", samples=2, store=store),
            interp.score(vit, "vit", samples=1, batch=3, store=store),
            interp.score(llava, "vhd", samples=1, prompt="w5 w9 w11", max_new_tokens=2, store=store)]
    return store, [r.id for r in runs]


def test_every_analysis_view_draws_a_real_run(app_store, other_runs):
    store, ids, _ = app_store
    drawn = {_drawn(open_run(run_id, store)) for kind, run_id in ids.items() if kind not in ("incomplete", "corrupt")}
    drawn |= {_drawn(open_run(run_id, other_runs[0])) for run_id in other_runs[1]}
    assert drawn == set(ANALYSES), f"no view drawn for {set(ANALYSES) - drawn}"


def test_a_renamed_parameter_reads_under_its_old_name():
    """circuits' `threshold` is `circuit_threshold` now: old runs' stored parameters and old calls still work."""
    circuits = ANALYSES["circuits"]
    assert circuits.resolve({"threshold": 0.5})["circuit_threshold"] == 0.5
    old = {**circuits.params, "threshold": 0.25}
    del old["circuit_threshold"]
    assert circuits.Params.upgrade(old) == {**circuits.params, "circuit_threshold": 0.25}


def test_a_parameter_added_since_a_run_reads_as_what_that_run_did():
    """retrieval's masking test masked the prompt's forward too before `mask_prefill` existed (its default now:
    decode steps only); a parameter without such a note reads as its default."""
    retrieval = ANALYSES["retrieval"]
    old = {k: v for k, v in retrieval.params.items() if k not in ("mask_prefill", "score_rule")}
    read = retrieval.stored_params({"params": old})
    assert read["mask_prefill"] is True and read["score_rule"] == "code"
    assert retrieval.stored_params({"params": {**old, "mask_prefill": False}})["mask_prefill"] is False
    assert retrieval.params["mask_prefill"] is False


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
