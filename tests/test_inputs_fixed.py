"""A run's user files (issue 28): each read during a run is checked against the digest recorded at its start (here and
on a cluster's workers); only declared path parameters are files; a file given to a parameter the analysis does not
read for the model is refused; images decode before anything is kept; FIFOs and devices fail promptly for every
path parameter of every analysis."""

import contextvars
import json
import os
import subprocess
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest

import interp
import interp.scoring
from helpers import cut_after
from interp.analyses.inputs import InputChangedError, file_digest
from interp.analyses.retrieval import Retrieval
from interp.analyses.summary import Summary
from interp.store import RunWriter, StoreError

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k")


@pytest.fixture
def haystack(tmp_path):
    words = "the cat sat on a mat and looked at the sky while birds sang".split()
    text = " ".join(f"{' '.join(words[(i + j) % len(words)] for j in range(12)).capitalize()}." for i in range(300))
    path = tmp_path / "hay.txt"
    path.write_text(text)
    return path


def _replace_after(monkeypatch, analysis_cls, n_done: int, path: Path, text: str):
    """Rewrite `path` once `n_done` samples have been scored (as an editor saving over it mid-run); returns the
    original method (to put back with monkeypatch.setattr)."""
    original, calls = analysis_cls.score_sample, []

    def replaced(self, *args):
        if len(calls) == n_done:
            path.write_text(text)
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(analysis_cls, "score_sample", replaced)
    return original


RETRIEVAL = dict(depths=[0, 50, 100], n_needles=1, lengths=[200], max_new_tokens=6, mask_k=[0])


def test_a_haystack_replaced_mid_run_stops_the_run_incomplete(stories, haystack, tmp_path, monkeypatch):
    text = haystack.read_text()
    original = _replace_after(monkeypatch, Retrieval, 1, haystack, text.replace("cat", "dog"))
    with pytest.raises(InputChangedError, match="hay.txt changed since the run started"):
        interp.score(stories, "retrieval", haystack=str(haystack), store=tmp_path / "runs", **RETRIEVAL)
    (run,) = interp.list_runs(tmp_path / "runs")
    assert run.status == "incomplete" and "changed since the run started" in run.error
    assert run.error.endswith("(after 1 of 3 samples)")
    assert run.meta["inputs"] == {str(haystack): file_digest("hay.txt", text.encode())}
    with pytest.raises(StoreError, match="changed since run"):  # resuming would mix them too
        interp.score(stories, "retrieval", haystack=str(haystack), store=tmp_path / "runs", resume=True, **RETRIEVAL)
    monkeypatch.setattr(Retrieval, "score_sample", original)
    haystack.write_text(text)
    done = interp.score(stories, "retrieval", haystack=str(haystack), store=tmp_path / "runs", resume=True, **RETRIEVAL)
    assert done.meta["status"] == "complete" and done.id == run.id


def test_a_file_replaced_mid_run_stops_a_run_kept_in_memory(stories, haystack, monkeypatch):
    _replace_after(monkeypatch, Retrieval, 1, haystack, haystack.read_text().replace("cat", "dog"))
    with pytest.raises(InputChangedError):
        interp.score(stories, "retrieval", haystack=str(haystack), **RETRIEVAL)


class InProcessWorkers:
    """An executor that is not LOCAL (so items go the way a cluster's do) but runs them here, each in an empty
    context, as a worker process would (nothing of the driver's `recorded_inputs` block)."""

    def map(self, fn, model, items):
        for j, item in enumerate(items):
            yield j, contextvars.Context().run(fn, model, item)


def test_a_file_replaced_mid_run_stops_the_run_on_a_clusters_workers(stories, haystack, tmp_path, monkeypatch):
    @contextmanager
    def workers(cluster, model):
        yield InProcessWorkers()

    monkeypatch.setattr(interp.scoring, "_executor", workers)
    _replace_after(monkeypatch, Retrieval, 1, haystack, haystack.read_text().replace("cat", "dog"))
    with pytest.raises(InputChangedError, match="changed since the run started"):  # the worker's check passed before
        interp.score(stories, "retrieval", haystack=str(haystack), store=tmp_path / "runs", **RETRIEVAL)
    assert interp.list_runs(tmp_path / "runs")[0].status == "incomplete"


def test_a_path_with_a_comma_is_hashed_kept_and_checked_on_resume(stories, tmp_path, monkeypatch):
    prompts = tmp_path / "c,d.txt"
    prompts.write_text("One prompt about a cat.\nAnother about a dog.\nA third about birds.\n")
    original = cut_after(monkeypatch, Summary, 1)
    with pytest.raises(RuntimeError, match="power cut"):
        interp.score(stories, "summary", prompts=str(prompts), store=tmp_path / "runs")
    (run,) = interp.list_runs(tmp_path / "runs")
    assert list(run.meta["inputs"]) == [str(prompts)] and list(run.meta["kept_inputs"]) == [str(prompts)]
    monkeypatch.setattr(Summary, "score_sample", original)
    prompts.write_text("Something else entirely.\nAnd more.\nAnd more still.\n")
    with pytest.raises(StoreError, match="c,d.txt changed since run"):
        interp.score(stories, "summary", prompts=str(prompts), store=tmp_path / "runs", resume=True)


def test_free_text_is_never_taken_for_a_path(stories, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("Describe the image.").write_text("not a prompt")  # sinks' default `prompt`
    Path("uniform").write_text("not a mode")  # retrieval's default mask_mode
    run = interp.score(stories, "sinks", samples=1, inputs="natural", max_tokens=16, store=tmp_path / "runs")
    assert run.meta["inputs"] == {} and "kept_inputs" not in run.meta and not (run.path / "inputs").exists()


def test_a_file_for_a_parameter_the_analysis_does_not_read_is_refused(stories, tmp_path):
    for analysis in ("taxonomy", "sinks"):
        with pytest.raises(ValueError, match=f"{analysis} parameter images: .* does not read it for stories260k"):
            interp.score(stories, analysis, images="/etc/passwd", store=tmp_path / "runs")
    with pytest.raises(ValueError, match="sinks parameter prompts: .* does not read it"):
        interp.score(stories, "sinks", inputs="random", prompts="/etc/passwd", store=tmp_path / "runs")
    assert interp.list_runs(tmp_path / "runs") == []


def test_images_that_do_not_decode_are_refused_before_anything_is_kept(tmp_path, monkeypatch):
    from tiny_models import make, vit_processor

    vit = interp.load_model(make("vit")[0], processor=vit_processor())
    kept = []
    monkeypatch.setattr(RunWriter, "keep_inputs", lambda self, paths: kept.append(paths))
    fake = tmp_path / "photo.png"
    fake.write_text("root:x:0:0:root:/root:/bin/bash\n")
    for analysis in ("vit", "sinks", "taxonomy"):
        with pytest.raises(ValueError, match="cannot read the image .*photo.png"):
            interp.score(vit, analysis, images=str(fake), store=tmp_path / "runs")
    assert kept == [] and interp.list_runs(tmp_path / "runs") == []


# ---- every path parameter of every analysis, given a FIFO or a symlink to /dev/zero

WALK = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {tests!r})
    import interp
    from interp.analyses import ANALYSES
    from interp.analyses.images import image_files, load_image
    from interp.analyses.inputs import read_prompts
    from interp.analyses.niah import file_sentences, read_needles
    from interp.analyses.tasks import jsonl_prompts
    from tiny_models import llava_with_processor, make, vit_processor

    hf, processor = llava_with_processor(n_layers=2)
    models = [interp.load_model("stories260k"), interp.load_model(make("vit")[0], processor=vit_processor()),
              interp.load_model(hf, processor=processor)]
    root, kinds = {root!r}, json.loads({kinds!r})
    readers = [read_prompts, file_sentences, read_needles, jsonl_prompts, image_files, load_image]

    def case(what, call):
        start = time.monotonic()
        try:
            call()
            outcome = "no error"
        except Exception as e:
            outcome = f"{{type(e).__name__}}: {{e}}"
        print(json.dumps([what, outcome, time.monotonic() - start]), flush=True)

    for kind, path in kinds.items():
        for a in ANALYSES.values():
            for name, (spec, _, _) in a.Params.specs().items():
                if not spec.path:
                    continue
                model = next((m for m in models if m.family.kind in a.kinds
                              and name in a.read_paths(m, a.resolve({{}}))), None)
                if model is None:
                    print(json.dumps([f"{{a.name}}.{{name}}", "no test model reads it", 0]), flush=True)
                    continue
                case(f"{{a.name}}.{{name}} {{kind}}", lambda: interp.score(model, a.name, samples=1, store=root,
                                                                          **{{name: path}}))
        for reader in readers:
            case(f"{{reader.__name__}} {{kind}}", lambda: reader(path))
""")


def test_every_path_parameter_refuses_a_fifo_and_a_device_promptly(tmp_path):
    fifo = tmp_path / "fifo" / "input.jsonl"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    link = tmp_path / "link" / "input.jsonl"
    link.parent.mkdir()
    link.symlink_to("/dev/zero")
    kinds = {"fifo": str(fifo), "symlink to /dev/zero": str(link)}
    script = WALK.format(tests=str(HERE), root=str(tmp_path / "runs"), kinds=json.dumps(kinds))
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                              preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired as e:
        done = e
    finished = (done.stdout or b"").decode() if isinstance(done.stdout, bytes) else done.stdout or ""
    assert not isinstance(done, subprocess.TimeoutExpired), f"a read hung after: {finished.splitlines()[-1:]}"
    assert done.returncode == 0, done.stderr[-3000:]
    cases = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(cases) >= 2 * (9 + 6), done.stdout  # 9 path parameters today, 6 readers
    for what, outcome, seconds in cases:
        assert outcome != "no test model reads it", f"{what}: give the test a model that reads it"
        assert outcome.startswith("ValueError: ") and "not a regular file" in outcome, (what, outcome)
        assert "\n" not in outcome and seconds < 10, (what, outcome, seconds)
        if "." in what.split()[0]:
            assert f"cannot read {what.split()[0].split('.')[1]} from" in outcome, (what, outcome)


def _limit_memory():
    """The child's heap is bounded, so an unguarded read of /dev/zero fails instead of filling the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30))
