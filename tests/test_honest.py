"""Results shown as they are (issue 31): warnings for tasks a model does not do, empty results said in words, the
masking test's spread, score tables that carry information, every table exported, runs found by prefix, sample
texts in the picker, one head notation (L-H), figures and tables downloadable."""

import io
import json
from dataclasses import replace

import pandas as pd
import plotly.graph_objects as go
import pytest

import interp
from interp.analyses.circuits import task_warnings
from interp.analyses.retrieval import masking_bars, masking_spread
from interp.app import figures
from interp.app.dashboard import Dashboard, make_app
from interp.app.parts import sample_label
from interp.cli import main, print_tables
from interp.compare import head_label
from interp.results import ScoreResult
from interp.store import RunNotFoundError


def _prompts(task, lds):
    return pd.DataFrame({"task": task, "clean_ld": lds, "clean_top1": [ld > 0 for ld in lds]})


def _faith(task, recovered):
    return pd.DataFrame({"task": task, "heads": [0, 5], "circuit": [False, True], "ld": [0.0, recovered * 0.13],
                         "clean_ld": 0.13, "recovered": [0.0, recovered]})


def test_a_task_the_model_does_not_do_is_flagged():
    """colored-objects on SmolLM2 (16 prompts): clean logit difference 0.13, faithfulness −329 %: both flagged."""
    prompts = pd.concat([_prompts("ioi", [3.0, 4.0]), _prompts("colored_objects", [0.5, -0.24])])
    faith = pd.concat([_faith("ioi", 0.9), _faith("colored_objects", -3.29)])
    warnings = task_warnings(prompts, faith)
    assert set(warnings["task"]) == {"colored_objects"} and len(warnings) == 2
    does_not, faithless = warnings["warning"]
    assert "does not do colored_objects: clean logit difference 0.13" in does_not and "50 % of 2 prompts" in does_not
    assert "faithfulness -329 % lies outside 0–150 %" in faithless
    assert task_warnings(None, None).empty and task_warnings(_prompts("ioi", [2.0]), _faith("ioi", 1.2)).empty


@pytest.fixture(scope="module")
def failing_circuit(app_store):
    """The planted circuits run of the dashboard's store, as if the model did not do its first task."""
    root, ids, _ = app_store
    run = interp.open_run(ids["circuits"], store=root)
    task = run.tables["prompts"]["task"].iloc[0]
    prompts = run.tables["prompts"].assign(clean_ld=lambda p: p["clean_ld"].where(p["task"] != task, 0.05))
    return run, replace(run, tables={**run.tables, "prompts": prompts}), task


def test_circuit_warnings_reach_the_report_the_view_and_the_run(failing_circuit, app_store, capsys):
    run, failing, task = failing_circuit
    assert run.tables["warnings"].empty  # the planted model does both tasks: no warning recorded
    analysis = interp.analyses.get_analysis("circuits")
    assert not any(line.startswith("warning:") for line in analysis.report(run))
    lines = analysis.report(failing)
    assert any(line.startswith(f"warning: the model does not do {task}: clean logit difference 0.05") for line in lines)
    notes = [item.text for item in failing.view() if isinstance(item, figures.Note)]
    assert any(text.startswith(f"⚠ warning: the model does not do {task}") for text in notes)
    print_tables(ScoreResult({**failing.meta, "report": lines}, failing.heads, failing.samples, failing.path,
                             failing.tables), 3)
    assert f"warning: the model does not do {task}" in capsys.readouterr().out


def test_circuits_count_prompts_and_show_them(failing_circuit, capsys):
    run, _, task = failing_circuit
    n = len(run.tables["prompts"])
    assert run.counted() == (n, n, "prompts") and n > len(run.meta["plan"]) == run.samples_done
    print_tables(run, 3)
    out = capsys.readouterr().out
    assert f"· {n}/{n} prompts ·" in out and "circuit (" in out
    circuit = run.tables["circuit"]
    assert f"{head_label(circuit['layer'].iloc[0], circuit['head'].iloc[0])}" in out  # L-H, never L.H
    tables = [item for item in run.view() if isinstance(item, go.Figure) and item.data
              and isinstance(item.data[0], go.Table)]
    header = list(tables[0].data[0].header.values)
    assert header[:3] == ["prompt", "expected", "foil"] and tables[0].layout.title.text.startswith(task)


def test_score_tables_that_carry_no_information_are_not_printed(capsys):
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "kv_head": 0, "copies": 0.0,
                          "mass": [0.1, 0.4, 0.3, 0.2], "gone": float("nan")})
    meta = {"id": "r", "analysis": "summary", "status": "complete", "plan": [{}],
            "model": {"name": "m", "family": "llama", "n_layers": 2, "n_heads": 2, "n_kv_heads": 1},
            "scores": {"copies": "copies", "mass": "mass", "gone": "gone"}, "report": []}
    print_tables(ScoreResult(meta, heads, pd.DataFrame({"sample": [0]})), 10)
    out = capsys.readouterr().out
    assert "top 4 heads by mass" in out and "top 4 heads by copies" not in out and "heads by gone" not in out
    assert "every head scores 0 (4 heads): no ranking to show" in out
    assert "no head has a value (4 heads): no ranking to show" in out


def test_the_masking_test_reports_the_spread_over_random_draws():
    masking = pd.DataFrame({"condition": ["none", "top", "random", "random", "random"], "k": [0, 2, 2, 2, 2],
                            "draw": [0, 0, 0, 1, 2], "mode": "uniform", "niah_score": [100, 20, 90, 60, 75.0]})
    spread = masking_spread(masking).set_index("condition")
    random = spread.loc["random"]
    assert (random["mean"], random["min"], random["max"], random["draws"]) == (75, 60, 90, 3)
    assert random["std"] == pytest.approx(15) and spread.loc["top", "std"] == 0
    bars = {t.name: t for t in masking_bars(masking).data}
    assert list(bars["random"].y) == [75] and list(bars["random"].error_y.array) == [15]
    assert list(bars["random"].error_y.arrayminus) == [15] and not bars["top"].error_y.visible
    old = masking_spread(masking.drop(columns="draw").iloc[:3])  # a run written before draws: one each
    assert list(old["draws"]) == [1, 1, 1]


def test_no_sink_dimensions_is_said_not_drawn(app_store):
    root, ids, _ = app_store
    run = interp.open_run(ids["sinks"], store=root)
    empty = pd.DataFrame({"layer": [0, 1], "visual_sinks": 0, "image_tokens": 4, "text_sinks": 0,
                          "percent_of_image": 0.0, "dims": ""})
    view = replace(run, tables={**run.tables, "visual_sinks": empty}).view()
    assert any(isinstance(i, figures.Note) and i.text.startswith("no sink dimensions found") for i in view)
    none = replace(run, tables={**run.tables, "visual_sinks": empty.assign(dims="12,40")}).view()
    assert any(isinstance(i, figures.Note) and i.text.startswith("no visual sink tokens found") for i in none)


def test_every_table_of_a_run_exports(app_store, tmp_path, capsys):
    root, ids, _ = app_store
    run = interp.open_run(ids["circuits"], store=root)
    assert run.table_names[:2] == ["heads", "samples"]
    assert {"faithfulness", "overlap", "warnings"} <= set(run.table_names)
    for name in ("faithfulness", "overlap", "prompts"):
        assert main(["export", ids["circuits"][:-2], "--table", name, "--store", str(root)]) == 0
        exported = pd.read_csv(io.StringIO(capsys.readouterr().out))
        assert list(exported.columns) == list(run.tables[name].columns) and len(exported) == len(run.tables[name])
    out = tmp_path / "rates.json"
    assert main(["export", ids["sinks"], "--table", "sink_rates", "--format", "json", "-o", str(out),
                 "--store", str(root)]) == 0
    rates = interp.open_run(ids["sinks"], store=root).tables["sink_rates"]
    pd.testing.assert_frame_equal(pd.DataFrame(json.loads(out.read_text())), rates, check_dtype=False)
    assert main(["export", ids["sinks"], "--table", "nope", "--store", str(root)]) == 1
    assert "has no table 'nope'; it has: heads, samples, massive, massive_layers, sink_rates" in capsys.readouterr().err
    assert main(["show", ids["sinks"], "--store", str(root)]) == 0
    assert "tables: heads, samples, massive, massive_layers, sink_rates (`interp export" in capsys.readouterr().out


def test_runs_open_by_prefix_and_tables_download_as_csv(app_store):
    root, ids, _ = app_store
    board = Dashboard(root)
    page = str(board.run_page(ids["retrieval"][:-3]))
    assert f"run {ids['retrieval']}" in page and "tables as CSV" in page
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        board.catalog.info("20")
    assert "ambiguous" in str(board.page("/run/20"))
    client = make_app(root).server.test_client()
    reply = client.get(f"/table/{ids['sinks'][:-3]}/sink_rates.csv")
    assert reply.status_code == 200 and reply.mimetype == "text/csv"
    rates = interp.open_run(ids["sinks"], store=root).tables["sink_rates"]
    assert reply.data.decode() == rates.to_csv(index=False)
    assert f"{ids['sinks']}-sink_rates.csv" in reply.headers["Content-Disposition"]
    assert client.get(f"/table/{ids['retrieval']}/nope.csv").status_code == 404
    assert client.get("/table/nowhere/heads.csv").status_code == 404


def test_the_sample_picker_shows_each_samples_text(app_store):
    root, ids, _ = app_store
    plan = interp.open_run(ids["retrieval"], store=root).meta["plan"]
    label = sample_label(0, plan[0])
    assert label.startswith("0: length 200, depth 0.0") and plan[0]["question"][:30] in label
    long = sample_label(3, {"text": "word " * 40})
    assert long.endswith("…") and len(long.split(": ", 1)[1]) <= 70
    batch = sample_label(1, {"task": "ioi", "prompts": [{"clean": "When Mary and John went"}] * 6})
    assert batch == "1: task ioi, 6 prompts: When Mary and John went"


def test_retrieval_view_shows_question_expected_answer_and_response(app_store):
    root, ids, _ = app_store
    run = interp.open_run(ids["retrieval"], store=root)
    [table] = [i for i in run.view() if isinstance(i, go.Figure) and i.data and isinstance(i.data[0], go.Table)]
    header = list(table.data[0].header.values)
    assert header[3:6] == ["question", "expected", "response"]
    cells = table.data[0].cells.values
    assert cells[4][0] == figures.plain(run.meta["plan"][int(cells[0][0])]["answer"])
