"""The results store: atomic runs, resume without redoing samples, no clashes, clear errors on corrupt runs."""

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest

import interp
from interp.analyses import get_analysis
from interp.analyses.summary import Summary
from interp.app.dashboard import Dashboard
from interp.app.figures import Note
from interp.cli import main
from interp.store import CorruptRunError, RunNotFoundError, Store, StoreError


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k")


def test_a_run_is_a_directory_of_json_and_parquet(stories, tmp_path):
    r = interp.score(stories, "summary", samples=2, max_tokens=24, store=tmp_path)
    assert r.path.parent == tmp_path and r.status == "complete"
    assert sorted(p.name for p in r.path.iterdir()) == ["heads.parquet", "meta.json", "samples.parquet"]
    meta = json.loads((r.path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["analysis"] == "summary" and meta["id"] == r.path.name
    assert meta["model"]["name"] == "stories260k" and meta["model"]["family"] == "llama"
    assert len(meta["model"]["config_hash"]) == 16
    assert set(meta["versions"]) >= {"interp", "torch", "transformers"}
    assert meta["started"] <= meta["finished"]
    assert meta["options"]["samples"] == 2 and meta["params"] == {"prompts": None} and len(meta["plan"]) == 2
    back = interp.open_run(r.id, store=tmp_path)
    pd.testing.assert_frame_equal(back.heads, r.heads)
    pd.testing.assert_frame_equal(back.samples, r.samples)
    assert interp.open_run(r.path).id == r.id  # by path
    assert interp.open_run(r.id[:18], store=tmp_path).id == r.id  # by unique prefix


def test_interrupted_run_resumes_without_redoing_samples(stories, tmp_path, monkeypatch):
    reference = interp.score(stories, "summary", samples=4, max_tokens=24)
    original = Summary.score_sample
    calls = []

    def flaky(self, model, sample, *args):
        calls.append(sample["prompt"])
        if len(calls) == 3:
            raise RuntimeError("power cut")
        return original(self, model, sample, *args)

    monkeypatch.setattr(Summary, "score_sample", flaky)
    with pytest.raises(RuntimeError, match="power cut"):
        interp.score(stories, "summary", samples=4, max_tokens=24, store=tmp_path)
    [info] = interp.list_runs(tmp_path)
    assert info.status == "incomplete" and info.progress == (2, 4)
    assert "power cut" in info.error and not (info.path / "heads.parquet").exists() and info.status != "running"
    partial = interp.open_run(info.id, store=tmp_path)  # the finished samples can be looked at already
    assert partial.status == "incomplete" and partial.samples["sample"].nunique() == 2

    calls.clear()
    done = interp.score(stories, "summary", samples=4, max_tokens=24, store=tmp_path, resume=True)
    assert done.id == info.id and done.status == "complete"
    assert calls == [reference.meta["plan"][2]["prompt"], reference.meta["plan"][3]["prompt"]]  # only the rest
    pd.testing.assert_frame_equal(done.heads, reference.heads, rtol=1e-6, atol=1e-7)
    assert [r.status for r in interp.list_runs(tmp_path)] == ["complete"]
    assert not (done.path / "parts").exists()


def test_resume_finds_only_a_matching_run_and_by_id_keeps_the_runs_settings(stories, tmp_path, monkeypatch):
    def boom(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Summary, "score_sample", boom)
    with pytest.raises(KeyboardInterrupt):
        interp.score(stories, "summary", samples=2, max_tokens=24, store=tmp_path)
    monkeypatch.undo()
    [info] = interp.list_runs(tmp_path)
    assert info.error.startswith("interrupted")
    other = interp.score(stories, "summary", samples=3, max_tokens=24, store=tmp_path, resume=True)
    assert other.id != info.id  # different options: a new run
    by_id = interp.score(stories, "summary", store=tmp_path, resume=info.id)
    assert by_id.id == info.id and by_id.meta["options"]["samples"] == 2 and by_id.samples["sample"].nunique() == 2
    with pytest.raises(StoreError, match="already complete"):
        interp.score(stories, "summary", store=tmp_path, resume=info.id)
    minilm = interp.load_model("minilm-l6")
    monkeypatch.setattr(Summary, "score_sample", boom)
    with pytest.raises(KeyboardInterrupt):
        interp.score(stories, "summary", samples=2, store=tmp_path)
    monkeypatch.undo()
    newest = interp.list_runs(tmp_path)[0]
    with pytest.raises(StoreError, match="made with stories260k"):
        interp.score(minilm, "summary", store=tmp_path, resume=newest.id)
    assert interp.list_runs(tmp_path)[0].status == "incomplete"  # the refused resume let go of the run


def _create(root):
    w = Store(root).create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {}, "plan": []},
                           slug="m-summary")
    w.unlock()
    return w.id


def test_runs_started_together_never_clash(tmp_path):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_create, [tmp_path] * 16)
    assert len(set(ids)) == 16 and len(list(tmp_path.iterdir())) == 16


def _hold(args):
    root, run_id, barrier = args
    barrier.wait()
    try:
        w = Store(root).reopen(run_id)
    except StoreError:
        return False
    import time

    time.sleep(0.5)
    w.unlock()
    return True


def test_only_one_process_can_take_a_run(tmp_path):
    w = Store(tmp_path).create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {},
                                "plan": [{}]}, slug="m")
    w.unlock()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(6)
        with ctx.Pool(6) as pool:
            took = pool.map(_hold, [(tmp_path, w.id, barrier)] * 6)
    assert sum(took) == 1


def test_a_run_being_written_cannot_be_taken_over(tmp_path):
    store = Store(tmp_path)
    w = store.create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {}, "plan": [{}]},
                     slug="m-summary")
    assert store.runs()[0].status == "running"
    with pytest.raises(StoreError, match="being written by another process"):
        store.reopen(w.id)
    w.unlock()  # as when the writing process dies: the kernel drops its lock
    assert store.runs()[0].status == "incomplete"
    store.reopen(w.id).unlock()


def test_a_full_disk_at_run_creation_leaves_nothing_behind(tmp_path, monkeypatch):
    """No hidden `.<id>.new` folder and no lock left when meta.json cannot be written: a clear StoreError."""
    import errno

    import interp.store

    def full(path, obj):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(interp.store, "write_json", full)
    with pytest.raises(StoreError, match=f"cannot create a run in {tmp_path}: No space left on device"):
        Store(tmp_path).create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {},
                                "plan": []}, slug="m-summary")
    assert list(tmp_path.iterdir()) == []


def test_the_runs_a_process_stopped_are_known(tmp_path):
    """What an interrupted command can truthfully say it left incomplete: each run it stopped, until it finishes
    (none when it was stopped before a run started, e.g. while loading the model)."""
    from interp.store import stopped_runs

    before = stopped_runs()  # other tests in this process may have stopped runs
    w = Store(tmp_path).create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {},
                                "plan": [{}]}, slug="m-summary")
    w.fail("interrupted (after 0 of 1 samples)")
    assert stopped_runs() == [*before, w.id]
    w.finish(pd.DataFrame({"layer": [0]}), pd.DataFrame({"sample": [0]}), {}, [])
    w.unlock()
    assert stopped_runs() == before


def test_a_claim_is_held_by_one_process_at_a_time(tmp_path):
    """A sweep's claim on a combination: a second holder is told at once (or waits for it), a different
    combination is free."""
    import threading

    store = Store(tmp_path)
    one, other = {"analysis": "summary", "params": {"n": 1}}, {"analysis": "summary", "params": {"n": 2}}
    with store.claim(one) as mine:
        assert mine
        with store.claim(one) as again, store.claim(other) as free:
            assert not again and free
        waited = []

        def wait():
            with store.claim(one, wait=True) as got:
                waited.append(got)

        waiter = threading.Thread(target=wait)
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # waiting while this holder scores
    waiter.join(5)
    assert waited == [True]
    assert [p.name for p in tmp_path.iterdir()] == [".claims"] and store.runs() == []


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_corrupt_runs_are_listed_and_explained_never_unpickled(stories, tmp_path):
    good = interp.score(stories, "summary", samples=1, max_tokens=16, store=tmp_path)
    broken = {}
    for name, damage in {
        "no-meta": lambda p: (p / "meta.json").unlink(),
        "bad-json": lambda p: (p / "meta.json").write_text("{not json"),
        "no-heads": lambda p: (p / "heads.parquet").unlink(),
        "pickled-heads": lambda p: (p / "heads.parquet").write_bytes(pickle.dumps(_Marker(str(tmp_path / "pwned")))),
        "bad-status": lambda p: (p / "meta.json").write_text(json.dumps({**good.meta, "status": "weird"})),
    }.items():
        path = tmp_path / f"20990101-000000-{name}"
        path.mkdir()
        for f in good.path.iterdir():
            (path / f.name).write_bytes(f.read_bytes())
        damage(path)
        broken[name] = path
    (tmp_path / "stray-file.txt").write_text("not a run")
    listing = {r.id: r for r in interp.list_runs(tmp_path)}
    assert listing[good.id].status == "complete"
    for name in ("no-meta", "bad-json", "bad-status"):
        assert listing[broken[name].name].status == "corrupt" and listing[broken[name].name].error
    assert "meta.json is missing" in listing[broken["no-meta"].name].error
    assert "unknown status" in listing[broken["bad-status"].name].error
    with pytest.raises(CorruptRunError, match="heads.parquet is missing"):
        interp.open_run(broken["no-heads"])
    with pytest.raises(CorruptRunError, match="heads.parquet cannot be read"):
        interp.open_run(broken["pickled-heads"])
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CorruptRunError, match="meta.json cannot be read"):
        interp.open_run(broken["bad-json"])
    with pytest.raises(RunNotFoundError, match="no run 'nope'"):
        interp.open_run("nope", store=tmp_path)
    with pytest.raises(RunNotFoundError, match="ambiguous"):
        interp.open_run("2099", store=tmp_path)


def test_unwritable_store_fails_before_any_work(stories, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    called = []
    monkeypatch.setattr(Summary, "plan", lambda *a: called.append(1) or [])
    with pytest.raises(StoreError, match="cannot write runs to"):
        interp.score(stories, "summary", store=blocker / "runs")
    assert not called


def test_arrays_are_safetensors(tmp_path):
    import torch
    from safetensors.torch import load_file

    w = Store(tmp_path).create({"analysis": "summary", "model": {"name": "m"}, "options": {}, "params": {}, "plan": []},
                               slug="m")
    t = torch.arange(12.0).reshape(3, 4)
    path = w.write_arrays("pooled", {"layer0": t})
    assert torch.equal(load_file(str(path))["layer0"], t)


def test_fifos_and_devices_are_corrupt_runs_and_bad_inputs_never_hangs(stories, tmp_path):
    """A FIFO or /dev/zero where a run's meta.json or a table should be: `interp runs` and `show` answer at once
    (the run is corrupt, with the reason); the same as the user's prompts or image is a clear error."""
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    interp.score(stories, "summary", samples=1, max_tokens=16, store=runs)
    interp.score(stories, "summary", samples=1, max_tokens=16, store=runs)
    interp.score(stories, "summary", samples=1, max_tokens=16, store=runs)
    fifo_run, zero_run, table_run = sorted(p for p in runs.iterdir())
    (fifo_run / "meta.json").unlink()
    os.mkfifo(fifo_run / "meta.json")
    (zero_run / "meta.json").unlink()
    (zero_run / "meta.json").symlink_to("/dev/zero")
    (table_run / "heads.parquet").unlink()
    os.mkfifo(table_run / "heads.parquet")
    cli = lambda *argv: subprocess.run([sys.executable, "-m", "interp.cli", *argv, "--store", str(runs)],  # noqa: E731
                                       capture_output=True, text=True, timeout=60)
    listing = cli("runs")
    assert listing.returncode == 0 and listing.stdout.count("corrupt") == 2, listing.stdout
    assert "not a regular file" in listing.stdout
    shown = cli("show", table_run.name)
    assert shown.returncode == 1 and "heads.parquet" in shown.stderr and "not a regular file" in shown.stderr
    prompts = tmp_path / "prompts.txt"
    os.mkfifo(prompts)
    for source in (prompts, "/dev/zero"):
        with pytest.raises(ValueError, match="cannot read prompts from .*not a regular file"):
            interp.score(stories, "summary", prompts=str(source))
    from interp.analyses.images import load_image

    image = tmp_path / "image.png"
    os.mkfifo(image)
    with pytest.raises(ValueError, match="cannot read the image .*not a regular file"):
        load_image(str(image))


def test_resume_refuses_when_an_input_file_changed(stories, tmp_path, monkeypatch):
    """A prompts file edited between a cut run and its resume: resuming would mix two inputs, so it is refused,
    naming the file; unchanged, the run resumes."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one upon a time\nthe cat sat\nLily went home\n")
    from helpers import cut_after

    original = cut_after(monkeypatch, Summary, 1)
    with pytest.raises(RuntimeError):
        interp.score(stories, "summary", prompts=str(prompts), store=tmp_path / "runs")
    monkeypatch.setattr(Summary, "score_sample", original)
    [info] = interp.list_runs(tmp_path / "runs")
    prompts.write_text("one upon a time\nthe dog sat\nLily went home\n")
    for resume in (True, info.id):
        with pytest.raises(StoreError, match=f"{prompts} changed since run {info.id} started"):
            interp.score(stories, "summary", prompts=str(prompts), store=tmp_path / "runs", resume=resume)
    prompts.write_text("one upon a time\nthe cat sat\nLily went home\n")
    done = interp.score(stories, "summary", prompts=str(prompts), store=tmp_path / "runs", resume=True)
    assert done.id == info.id and done.status == "complete"


def test_readers_never_look_like_writers(stories, tmp_path):
    """A listing probes a run's lock with a shared lock: another reader's probe held at that moment is not a
    writer, and a writer taking the run waits such a probe out."""
    import fcntl
    import os
    import threading

    from interp.store import _is_locked, _take_lock

    run = interp.score(stories, "summary", samples=1, max_tokens=16, store=tmp_path)
    (run.path / "lock").touch()
    probe = os.open(run.path / "lock", os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH)  # another listing, at this very moment
    assert not _is_locked(run.path)
    threading.Timer(0.05, lambda: os.close(probe)).start()  # ... which ends 50 ms later
    fd = _take_lock(run.path)
    assert fd is not None and _is_locked(run.path)  # the writer got it, and now it is a writer
    os.close(fd)
    assert not _is_locked(run.path)


def test_kept_inputs_are_found_whatever_their_names():
    """A kept copy is used for a whole recorded path (commas in an image's name included), for a part of an "a,b"
    value, and for names with dots; names that leave inputs/ are ignored."""
    from interp.scoring import input_digests
    from interp.store import with_kept_inputs

    meta = {"plan": [{"image": "/in/a,b.png"}, {"image": "/in/c.png"}], "params": {"p": "/in/t.txt, /in/u.txt"},
            "kept_inputs": {"/in/a,b.png": "inputs/0000-a,b.png", "/in/t.txt": "inputs/0001-t..txt",
                            "/in/c.png": "inputs/..", "/in/u.txt": "inputs/../../u.txt"}}
    local = with_kept_inputs(meta, "/run")
    assert local["plan"] == [{"image": "/run/inputs/0000-a,b.png"}, {"image": "/in/c.png"}]
    assert local["params"]["p"] == "/run/inputs/0001-t..txt, /in/u.txt"
    assert input_digests({"prompt": "a" * 400}) == {}  # a long text parameter is not a path (no OSError)


OLD_RUNS = Path(__file__).parent / "data" / "old-runs"  # written by interp at b8db306, before runs described themselves


def test_runs_written_before_parameters_were_typed_still_open(tmp_path, capsys):
    """A summary run and a circuits run (its parameter `threshold`, now `circuit_threshold`; no
    `sample_columns` or `describe` in meta.json) open in the CLI, the dashboard and the analysis views."""
    store = tmp_path / "store"
    shutil.copytree(OLD_RUNS, store)
    summary, circuits = (next(store.glob(f"*-{name}-*")).name for name in ("summary", "circuits"))
    meta = json.loads((store / circuits / "meta.json").read_text())
    assert meta["params"]["threshold"] == 0.6 and "sample_columns" not in meta and "describe" not in meta

    assert main(["show", circuits, "--store", str(store), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    effects = [r["value"] for r in shown["top"]["oldtask_eap"]]
    assert effects == sorted(effects, key=abs, reverse=True)  # ranked by |effect|, as circuits' signed scores
    assert main(["show", summary, "--store", str(store)]) == 0
    assert "top" in capsys.readouterr().out

    result = interp.open_run(circuits, store)
    circuit_analysis = get_analysis("circuits")
    assert circuit_analysis.stored_params(result.meta)["circuit_threshold"] == 0.6  # the old name, read as today's
    notes = [item.text for item in result.view() if isinstance(item, Note)]
    assert "oldtask: circuit of 2 heads by oldtask_patching: 0-1, 1-2" in notes

    board = Dashboard(store)
    assert {r["status"] for r in board.runs_rows()} == {"complete"}
    for run in (summary, circuits):
        page = str(board.page(f"/run/{run}"))
        assert "H2('" + run.split("-")[3] + " on " in page and "B('complete')" in page, page[:500]
        assert board.analysis_view(board.catalog.result(run))
    assert board.score_choices(circuits)[0][:2] == ["oldtask_patching", "oldtask_eap"]
