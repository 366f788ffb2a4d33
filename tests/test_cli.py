"""The `interp` CLI: score / runs / show / export / models, exit codes, JSON output, quiet when not a terminal."""

import io
import os
import json
import subprocess
import sys

import pandas as pd
import pytest

import interp
from interp.cli import main

SMALL = ["stories260k", "--samples", "2", "--max-tokens", "24"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `interp argv...`; argparse's own errors exit through SystemExit."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    assert main(["score", *SMALL, "--out", str(root), "--json"]) == 0
    return root


def test_score_prints_ranked_tables_and_the_run(capsys, tmp_path):
    code, out, err = run(capsys, "score", *SMALL, "--out", str(tmp_path), "--top", "3", "--layers", "0-2", "--heads", "1,4")
    assert code == 0, err
    [info] = interp.list_runs(tmp_path)
    assert f"run {info.id}" in out and str(info.path) in out
    for score in ("entropy", "max_prob", "distance", "first_token_mass"):
        assert f"top 3 heads by {score}" in out
    heads = interp.open_run(info.id, store=tmp_path).heads
    assert set(heads["layer"]) == {0, 1, 2} and set(heads["head"]) == {1, 4}
    best = heads.sort_values("distance", ascending=False).iloc[0]
    block = out.split("top 3 heads by distance")[1].splitlines()[2].split()
    assert block[:4] == ["1", *(str(int(best[c])) for c in ("layer", "head", "kv_head"))]


def test_json_is_stable_and_alone_on_stdout(capsys, tmp_path):
    code, out, err = run(capsys, "score", *SMALL, "--out", str(tmp_path), "--json", "--top", "2")
    assert code == 0
    doc = json.loads(out)
    [r] = doc["runs"]
    assert set(r) >= {"id", "path", "status", "analysis", "model", "options", "params", "samples", "samples_done",
                      "started", "finished", "scores", "top", "report", "tables"}
    assert r["status"] == "complete" and r["samples"] == r["samples_done"] == 2
    assert set(r["top"]) == set(r["scores"]) == {"entropy", "max_prob", "distance", "first_token_mass"}
    assert [set(x) for x in r["top"]["entropy"]] == [{"rank", "layer", "head", "kv_head", "value"}] * 2
    heads = interp.open_run(r["path"]).heads
    assert r["top"]["entropy"][0]["value"] == pytest.approx(heads["entropy"].max())
    assert "Loading" not in err and "samples" not in err  # no progress bars with --json
    code, out, _ = run(capsys, "show", r["id"], "--store", str(tmp_path), "--json", "--top", "2")
    assert code == 0 and json.loads(out) == r


def test_runs_show_export(capsys, store, tmp_path):
    code, out, _ = run(capsys, "runs", "--store", str(store))
    [info] = interp.list_runs(store)
    assert code == 0 and info.id in out and "complete" in out and "2/2" in out
    code, out, _ = run(capsys, "runs", "--store", str(store), "--json")
    assert json.loads(out)["runs"][0]["id"] == info.id
    code, out, _ = run(capsys, "show", info.id[:20], "--store", str(store))
    assert code == 0 and "top 10 heads by entropy" in out and info.id in out
    heads = interp.open_run(info.id, store=store).heads
    code, out, _ = run(capsys, "export", info.id, "--store", str(store), "--format", "csv")
    pd.testing.assert_frame_equal(pd.read_csv(io.StringIO(out)), heads, check_dtype=False)
    code, out, _ = run(capsys, "export", info.id, "--store", str(store), "--format", "json", "--table", "samples")
    assert len(json.loads(out)) == len(interp.open_run(info.id, store=store).samples)
    target = tmp_path / "h.parquet"
    code, _, err = run(capsys, "export", info.id, "--store", str(store), "--format", "parquet", "-o", str(target))
    assert code == 0 and "wrote heads table" in err
    pd.testing.assert_frame_equal(pd.read_parquet(target), heads)


def test_empty_store_and_corrupt_run_in_listing(capsys, tmp_path):
    code, out, _ = run(capsys, "runs", "--store", str(tmp_path / "none"))
    assert code == 0 and "no runs" in out
    (tmp_path / "20990101-x").mkdir()
    (tmp_path / "20990101-x" / "meta.json").write_text("[")
    code, out, _ = run(capsys, "runs", "--store", str(tmp_path))
    assert code == 0 and "corrupt" in out and "meta.json cannot be read" in out
    code, _, err = run(capsys, "show", "20990101-x", "--store", str(tmp_path))
    assert code == 1 and "meta.json cannot be read" in err


@pytest.mark.parametrize("argv, code, message", [
    (["score", "stories260k", "--analysis", "nope"], 2, "known analyses: summary"),
    (["score", "stories260k", "--layers", "a-b"], 2, "--layers 'a-b'"),
    (["score", "stories260k", "--samples", "0"], 2, "--samples must be at least 1"),
    (["score", "stories260k", "--samples", "100000000"], 2, "--samples 100000000: give at most 1,000,000"),
    (["score", "stories260k", "--layers", "0-99999999"], 2, "--layers '0-99999999': indices lie in 0..99999"),
    (["score", "stories260k", "--heads", "0-" + "9" * 400], 2, "..." + "': indices lie in 0..99999"),
    (["score", "stories260k", "--layers", ""], 2, "--layers '': give indices"),
    (["score", "stories260k", "--backend", "vllm"], 2, "invalid choice"),
    (["frobnicate"], 2, "invalid choice"),
    (["export", "x", "--format", "xml"], 2, "invalid choice"),
    (["score", "no-such-model"], 1, "not a built-in alias"),
    (["score", "./no/such/folder"], 1, "no model folder"),
    (["score", "stories260k", "--layers", "9"], 1, "out of range"),
    (["show", "nope"], 1, "no run 'nope'"),
    (["export", "nope"], 1, "no run 'nope'"),
])
def test_exit_codes_and_messages(capsys, tmp_path, argv, code, message):
    if argv[0] != "frobnicate":
        argv = [*argv, "--store" if argv[0] in ("show", "export") else "--out", str(tmp_path)]
    got, out, err = run(capsys, *argv)
    assert got == code and message in err and out == "" and len(err) < 5000  # usage + a short message


def test_unwritable_out_and_inapplicable_family(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "score", *SMALL, "--out", str(blocker / "runs"))
    assert code == 1 and "cannot write runs to" in err
    from tiny_models import make

    vit, _ = make("vit", "sdpa")
    vit.save_pretrained(tmp_path / "vit")
    code, _, err = run(capsys, "score", str(tmp_path / "vit"), "--out", str(tmp_path / "s"))
    assert code == 1 and "does not apply" in err and "gpt2, llama" in err
    assert interp.list_runs(tmp_path / "s") == []


def test_resume_from_the_command_line(capsys, tmp_path, monkeypatch):
    from interp.analyses.summary import Summary

    original = Summary.score_sample
    count = []

    def interrupted(self, *args):
        count.append(1)
        if len(count) == 2:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Summary, "score_sample", interrupted)
    code, _, err = run(capsys, "score", *SMALL, "--out", str(tmp_path))
    assert code == 1 and "--resume" in err
    [info] = interp.list_runs(tmp_path)
    code, out, _ = run(capsys, "show", info.id, "--store", str(tmp_path))
    assert code == 0 and "1/2 samples · incomplete" in out and f"--resume {info.id}" in out
    code, out, _ = run(capsys, "score", *SMALL, "--out", str(tmp_path), "--resume")
    assert code == 0 and f"run {info.id}" in out and len(count) == 3
    assert [r.status for r in interp.list_runs(tmp_path)] == ["complete"]


def test_console_script_is_quiet_when_not_a_terminal(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "interp.cli", "score", *SMALL, "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "top 10 heads by entropy" in proc.stdout
    assert "\r" not in proc.stderr and "it/s" not in proc.stderr
    bad = subprocess.run([sys.executable, "-m", "interp.cli", "score", "--analysis", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "known analyses" in bad.stderr and bad.stdout == ""


def test_progress_bars_only_on_a_terminal_and_never_with_json(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = run(capsys, "score", *SMALL, "--out", str(tmp_path))
    assert code == 0 and "summary: samples" in err and "layers" in err
    code, out, err = run(capsys, "score", *SMALL, "--out", str(tmp_path), "--json")
    assert code == 0 and err == "" and json.loads(out)


def test_resume_matches_a_run_scored_on_chosen_layers_and_heads(capsys, tmp_path, monkeypatch):
    from interp.analyses.summary import Summary

    original = Summary.score_sample
    monkeypatch.setattr(Summary, "score_sample", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    argv = ["score", *SMALL, "--layers", "1-2", "--heads", "0,3", "--out", str(tmp_path)]
    code, _, err = run(capsys, *argv)
    [info] = interp.list_runs(tmp_path)
    assert code == 1 and f"interrupted; run {info.id} stays incomplete" in err and "--resume" in err
    monkeypatch.setattr(Summary, "score_sample", original)
    [info] = interp.list_runs(tmp_path)
    code, out, _ = run(capsys, *argv, "--resume")
    assert code == 0 and f"run {info.id}" in out and len(interp.list_runs(tmp_path)) == 1


def test_score_circuits_from_the_command_line(capsys, tmp_path):
    """`--analysis circuits --tasks` with a user JSONL task on stories260k (whose tokenizer has too few one-token names
    for IOI: a clear error, exit 1)."""
    task = tmp_path / "names.jsonl"
    rows = [("Lily and Tim went to the park. Tim gave a ball to", "Tim and Lily went to the park. Lily gave a ball to",
             " Lily", " Tim"),
            ("Tim and Lily went to the park. Lily gave a ball to", "Lily and Tim went to the park. Tim gave a ball to",
             " Tim", " Lily")]
    task.write_text("".join(json.dumps(dict(zip(("clean", "corrupt", "correct", "foil"), r))) + "\n" for r in rows))
    code, out, err = run(capsys, "score", "stories260k", "--analysis", "circuits", "--tasks", str(task), "--methods",
                         "patching,eap", "--circuit-percent", "5", "--faithfulness-percents", "10", "--per-position",
                         "--out", str(tmp_path / "runs"), "--top", "3")
    assert code == 0, err
    assert "top 3 heads by names_patching" in out and "names: 2 prompts" in out and "circuit (2 heads" in out
    result = interp.open_run(out.split("\nrun ")[1].split()[0], store=tmp_path / "runs")
    assert result.meta["params"]["per_position"] is True and "patching" in result.tables["positions"].columns
    code, _, err = run(capsys, "score", "stories260k", "--analysis", "circuits", "--tasks", "ioi",
                       "--out", str(tmp_path / "runs"))
    assert code == 1 and "needs at least 5 names" in err
    code, _, err = run(capsys, "score", "stories260k", "--tasks", "ioi", "--out", str(tmp_path / "runs"))
    assert code == 2 and "--tasks applies to none of summary" in err



def test_export_writes_regular_files_only_and_never_into_the_store(capsys, store, tmp_path):
    info = interp.list_runs(store)[0]
    meta = (info.path / "meta.json").read_bytes()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    target = tmp_path / "elsewhere.csv"
    target.write_text("keep me")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    for out, message in [(fifo, "not a regular file"), (link, "is a symlink"), (tmp_path, "is a folder"),
                         (info.path / "meta.json", "inside the store"), (store / "new.csv", "inside the store")]:
        code, _, err = run(capsys, "export", info.id, "--store", str(store), "-o", str(out))
        assert code == 1 and message in err, (out, err)
    assert fifo.is_fifo() and link.is_symlink() and target.read_text() == "keep me"
    assert (info.path / "meta.json").read_bytes() == meta and not (store / "new.csv").exists()
    code, _, _ = run(capsys, "export", info.id, "--store", str(store), "-o", str(target))
    assert code == 0 and target.read_text().startswith("layer,head")  # a regular file is replaced
    for fmt in ("csv", "json", "parquet"):  # '-': standard output, binary parquet included
        out = subprocess.run([sys.executable, "-m", "interp.cli", "export", info.id, "--store", str(store),
                              "--format", fmt, "-o", "-"], capture_output=True, timeout=120)
        assert out.returncode == 0 and out.stderr == b"", out.stderr
        table = pd.read_parquet(io.BytesIO(out.stdout)) if fmt == "parquet" else (
            pd.read_csv(io.BytesIO(out.stdout)) if fmt == "csv" else pd.read_json(io.BytesIO(out.stdout)))
        assert len(table) == len(interp.open_run(info.path).heads)


def test_show_displays_what_an_incomplete_run_has(capsys, tmp_path, monkeypatch):
    """A sinks run cut after its first sample has no random-token score yet: `show` prints the others."""
    from helpers import cut_after
    from interp.analyses.sinks import Sinks

    cut_after(monkeypatch, Sinks, 1)
    code, _, err = run(capsys, "score", "stories260k", "--analysis", "sinks", "--out", str(tmp_path))
    assert code == 1 and "power cut" in err
    [info] = interp.list_runs(tmp_path)
    code, out, err = run(capsys, "show", info.id, "--store", str(tmp_path))
    assert code == 0, err
    assert "sink_rate: " in out and "sink_rate_random: " in out and "no finished sample gives it" in out
    assert "top 1 heads by any_sink_rate" in out and "(the other 39 heads score 0)" in out  # zeros rank nothing
    code, out, _ = run(capsys, "show", info.id, "--store", str(tmp_path), "--json")
    shown = json.loads(out)
    assert code == 0 and "sink_rate" in shown["top"] and "sink_rate_random" not in shown["top"]


def test_everyday_commands_do_not_import_torch(store):
    """`runs`, `show`, `export` and `models` read JSON, Parquet and the catalog only: they must start fast, so
    neither torch nor transformers is imported (benchmarks/cli_speed.py times them)."""
    [info] = [i for i in interp.list_runs(store) if i.status == "complete"][:1]
    for argv in (["runs", "--store", str(store)], ["models"], ["show", info.id, "--store", str(store)],
                 ["export", info.id, "--store", str(store)]):
        code = ("import sys\nfrom interp.cli import main\nassert main(%r) == 0\n"
                "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'nnsight'})\n"
                "assert not heavy, heavy\n" % argv)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (argv, out.stderr[-500:])


def test_sigterm_stops_a_run_like_ctrl_c_and_a_file_is_not_a_store(capsys, tmp_path):
    """`kill` (SIGTERM) mid-run: the run is left incomplete with the reason recorded, resumable; a store path that
    is a file is an error, not an empty store."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "interp.cli", "score", "stories260k", "--analysis", "sinks",
                             "--out", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/parts/sample-*.parquet")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "interrupted" in err
    [info] = interp.list_runs(tmp_path / "runs")
    assert info.status == "incomplete" and info.error.startswith("interrupted (after ")
    (tmp_path / "file").write_text("x")
    code, out, err = run(capsys, "runs", "--store", str(tmp_path / "file"))
    assert code == 1 and "is not a folder" in err and "no runs" not in out


def test_a_run_failing_before_its_first_sample_leaves_nothing_behind(capsys, tmp_path):
    """`--device meta` loads, then cannot compute: the run created for it is removed (no empty incomplete run)."""
    code, _, err = run(capsys, "score", "stories260k", "--device", "meta", "--out", str(tmp_path))
    assert code == 1 and "meta" in err
    assert interp.list_runs(tmp_path) == []


def test_unknown_analysis_or_missing_model_fields_are_clear_errors(capsys, store, tmp_path):
    import shutil

    source = next(i for i in interp.list_runs(store) if i.status == "complete")
    for name, change in [("unknown", lambda m: m.update(analysis="nope", report=None) or m.pop("report")),
                         ("fieldless", lambda m: m["model"].pop("family"))]:
        run_dir = tmp_path / f"{source.id[:-6]}{name}"
        shutil.copytree(source.path, run_dir)
        meta = json.loads((run_dir / "meta.json").read_text())
        change(meta)
        meta["id"] = run_dir.name
        (run_dir / "meta.json").write_text(json.dumps(meta))
    code, out, err = run(capsys, "show", f"{source.id[:-6]}fieldless", "--store", str(tmp_path))
    assert code == 0 and f"({'?'}, " in out, err  # what the run lacks is shown as ?, not a KeyError
    code, _, err = run(capsys, "show", f"{source.id[:-6]}unknown", "--store", str(tmp_path))
    assert code == 1 and "unknown analysis 'nope'" in err and "KeyError" not in err


def test_json_output_silences_libraries_progress_bars(monkeypatch):
    """With --json (or no terminal) no bar is drawn, including tqdm bars libraries draw themselves (transformers'
    GGUF de-quantisation on the first use of smollm2-135m)."""
    from tqdm import std
    from tqdm.auto import tqdm

    from interp.cli import _progress, build_parser

    monkeypatch.setattr(std.tqdm, "__init__", std.tqdm.__init__)  # both restored after the test
    monkeypatch.setattr(std.tqdm, "_interp_silenced", False, raising=False)
    _progress(build_parser().parse_args(["score", "--json"]))
    drawn = io.StringIO()
    for _ in tqdm(range(3), file=drawn, desc="Converting and de-quantizing GGUF tensors..."):
        pass
    assert drawn.getvalue() == ""


def test_a_reader_closing_the_pipe_early_stops_the_command_quietly(store):
    """`interp show RUN | head`: once the reader has gone, the command stops with no message and code 141 (128 +
    SIGPIPE, what a shell reports for other Unix tools stopped that way), not "Broken pipe" and code 1."""
    [info] = [i for i in interp.list_runs(store) if i.status == "complete"][:1]
    for argv in (["show", info.id], ["runs"], ["export", info.id]):
        proc = subprocess.Popen([sys.executable, "-m", "interp.cli", *argv, "--store", str(store)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before the command writes anything
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 141 and err == b"", (argv, err[-500:])


def test_help_is_fast():
    """`interp --help` lists the commands without importing the analyses (torch, transformers: seconds)."""
    code = ("import sys\nfrom interp.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    assert e.code == 0\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'})\n"
            "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "score" in out.stdout and "runs" in out.stdout, out.stderr[-500:]


ESCAPES = "\x1b]52;c;ZXZpbA==\x07\x1b[2J\x9b31m"  # a clipboard write, a screen clear, an 8-bit CSI


def test_a_runs_words_reach_the_terminal_without_their_control_characters(capsys, store, tmp_path, monkeypatch):
    """A planted run whose model name, score, report and directory name hold escape sequences: `runs`, `show`,
    `export` to a terminal and the errors show them as \\xNN, never obey them; --json escapes them as JSON does."""
    import shutil

    source = next(i for i in interp.list_runs(store) if i.status == "complete")
    run_dir = tmp_path / f"{source.id[:-6]}{ESCAPES}"
    shutil.copytree(source.path, run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta.update(id=run_dir.name, report=[f"report {ESCAPES}"])
    meta["model"]["name"] += ESCAPES
    meta["scores"] = {name: f"{meaning} {ESCAPES}" for name, meaning in meta["scores"].items()}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    broken = tmp_path / f"20990101-{ESCAPES}"
    broken.mkdir()
    (broken / "meta.json").write_text("[")
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    shown = [run(capsys, "runs", "--store", str(tmp_path)), run(capsys, "show", run_dir.name, "--store", str(tmp_path)),
             run(capsys, "export", run_dir.name, "--store", str(tmp_path)),
             run(capsys, "show", broken.name, "--store", str(tmp_path))]
    assert [code for code, _, _ in shown] == [0, 0, 0, 1]
    for _, out, err in shown:
        assert not any(c in out + err for c in "\x1b\x07\x9b"), (out, err)
    assert "\\x1b]52;c;ZXZpbA==\\x07\\x1b[2J" in shown[1][1] and "\\x1b" in shown[3][2]
    code, out, _ = run(capsys, "show", run_dir.name, "--store", str(tmp_path), "--json")
    assert code == 0 and "\x1b" not in out and json.loads(out)["model"]["name"].endswith(ESCAPES)


def test_an_interrupt_before_any_run_says_none_was_left(capsys, tmp_path, monkeypatch):
    """Interrupted while the model loads: no run exists, and the message says so (it used to say one stays
    incomplete)."""
    import interp.models

    monkeypatch.setattr(interp.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = run(capsys, "score", *SMALL, "--out", str(tmp_path))
    assert code == 1 and "interrupted; no run was left incomplete" in err and not interp.list_runs(tmp_path)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_cpus_per_worker_must_be_positive(capsys, value):
    """--cpus-per-worker 0 is refused (it was read as 1), before any Ray cluster starts."""
    code, _, err = run(capsys, "score", *SMALL, "--cluster", "ray", "--cpus-per-worker", value)
    assert code == 2 and "cpus_per_worker" in err and "> 0" in err
