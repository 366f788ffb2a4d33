"""Runs spread over Ray workers give the same tables as one process, bit for bit: summary, sinks and taxonomy on
stories260k, retrieval on the planted copying model, circuits on the planted circuit, vit and sinks on organism-vit,
the workers loading the model by name or path (the driver's copy holds no weights, so planning and finalize run on
them) or shipped as an object; a worker killed mid-run and mid-item; a driver killed mid-run on a head started as a
separate process and resumed there by address; sweeps; faults (a model a worker cannot load, workers that do not
start, a worker with another model or input file); the local cluster on loopback only. One local Ray cluster
(2 CPUs, 127.0.0.1) serves the module; each test stops the workers it starts."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray's servers on 127.0.0.1 (read at import)

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import interp  # noqa: E402
import planted  # noqa: E402
import planted_circuit  # noqa: E402
from interp.atlases import PRESETS, Atlas  # noqa: E402
from interp.cli import main  # noqa: E402
from interp.cluster import Cluster, ClusterError, Workers  # noqa: E402
from interp.scoring import input_digests, model_identity, same_as_driver  # noqa: E402
from interp.store import Store  # noqa: E402
from interp.sweep import check_sweep, read_sweep, run_sweep  # noqa: E402

pytestmark = pytest.mark.cluster
TWO = Cluster(workers=2)


def env() -> dict:
    """A child's environment: a driver joining a head by address sends the token Ray 2.60's heads ask for."""
    return {"RAY_AUTH_MODE": "token", **os.environ, "TQDM_DISABLE": "1"}


@pytest.fixture(scope="module")
def head():
    """This process's local Ray cluster: its GCS address (what other drivers connect to)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def stories():
    return interp.load_model("stories260k")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """This process's runs use one torch thread, as each worker does (--cpus-per-worker 1): the same arithmetic, so
    the tables are identical bit for bit (with 2 threads some reductions split differently: last-digit changes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def same_tables(a, b):
    pd.testing.assert_frame_equal(a.heads, b.heads, check_exact=True)
    pd.testing.assert_frame_equal(a.samples, b.samples, check_exact=True)
    assert sorted(a.tables) == sorted(b.tables)
    for name in a.tables:
        pd.testing.assert_frame_equal(a.tables[name], b.tables[name], obj=name, check_exact=True)


def test_summary_sinks_and_taxonomy_equal_one_process(head, stories):
    """taxonomy: its ablation test (finalize) spread over the workers too. The workers load the model by name and
    the driver's copy has no weights: a forward pass left on the driver would fail."""
    with Workers(Cluster(workers=2, model="stories260k")) as workers:  # the runs share them
        for analysis in ("summary", "sinks", "taxonomy"):
            one = interp.score(stories, analysis, samples=4)
            spread = interp.score("stories260k", analysis, samples=4, cluster=workers)
            same_tables(one, spread)
        assert len(workers.where) == 2 and workers.replaced == 0
    assert len(spread.tables["ablation"]) > 1  # the ablation test ran


def shipped(model, folder: Path) -> str:
    """`model` saved where the workers load it from (so the driver holds no weights)."""
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return str(folder)


def test_a_model_shipped_to_the_workers_scores_as_one_process(head, stories):
    with Workers(TWO, stories) as workers:  # an interp.Model object travels to the workers
        same_tables(interp.score(stories, "summary", samples=3), interp.score(stories, "summary", samples=3,
                                                                               cluster=workers))


def test_vit_and_sinks_on_organism_vit_equal_one_process(head):
    """The workers load the model by name and the driver holds no weights: the pruning curves (finalize) and the
    high-norm threshold fitted while planning (forward passes) run on the workers."""
    with Workers(Cluster(workers=2, model="organism-vit")) as workers:
        for analysis, params in (("vit", {"batch": 8}), ("sinks", {})):
            one = interp.score("organism-vit", analysis, samples=2, **params)
            spread = interp.score("organism-vit", analysis, samples=2, cluster=workers, **params)
            same_tables(one, spread)  # a forward pass on the driver's copy (meta tensors) would have failed
            assert spread.meta["plan"] == one.meta["plan"] and spread.meta["model"] == one.meta["model"]
    assert len(spread.meta["plan"][0]["high_norm"]) and len(one.tables) > 0


def test_retrieval_on_the_planted_model_equals_one_process(head, tmp_path):
    model = planted.model()
    rng = random.Random(0)
    (tmp_path / "hay.txt").write_text(" ".join(" ".join(rng.choice(planted.FILLER) for _ in range(6)) + " ."
                                               for _ in range(100)))
    (tmp_path / "needles.jsonl").write_text(json.dumps({
        "needle": "the secret code is alpha bravo charlie delta .", "question": "the secret code is",
        "answer": "alpha bravo charlie delta"}) + "\n")
    params = {"haystack": str(tmp_path / "hay.txt"), "needles": str(tmp_path / "needles.jsonl"),
              "template": "{context} {question}", "max_new_tokens": 8, "lengths": [120], "depths": [0, 50, 100],
              "mask_k": [2]}
    one = interp.score(model, "retrieval", **params)
    spread = interp.score(shipped(model, tmp_path / "planted"), "retrieval", cluster=TWO, **params)  # finalize there
    same_tables(one, spread)
    assert spread.tables["masking"].set_index("condition").loc["top", "heads"] == "1-1,1-3"  # the masking test ran


def test_circuits_on_the_planted_circuit_equal_one_process(head, tmp_path):
    model = planted_circuit.model()
    path = tmp_path / "first.jsonl"
    planted_circuit.write_task(path, n=8)
    params = {"tasks": str(path), "methods": "patching,eap", "circuit_percent": 25, "batch": 2}
    one = interp.score(model, "circuits", **params)
    spread = interp.score(shipped(model, tmp_path / "planted"), "circuits", cluster=TWO, **params)  # finalize there
    same_tables(one, spread)
    assert len(spread.tables["faithfulness"]) > 1


def prompts(tmp_path, n=16) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Once upon a time, a little fox number {i} found a red ball in the garden." for i in range(n)))
    return str(path)


def test_a_worker_killed_mid_run_changes_nothing(head, stories, tmp_path):
    file = prompts(tmp_path)
    one = interp.score(stories, "summary", prompts=file)
    with Workers(TWO, stories) as workers:
        original, killed = workers.map, []

        def killing(fn, model, items):  # kill worker 0 through Ray once the first sample is back
            for j, result in original(fn, model, items):
                if not killed:
                    killed.append(workers.actors[0])
                    ray.kill(workers.actors[0], no_restart=True)
                yield j, result

        workers.map = killing
        spread = interp.score(stories, "summary", prompts=file, cluster=workers, store=tmp_path / "store")
        assert workers.replaced == 1 and killed[0] not in workers.actors
    same_tables(one, spread)  # every sample once: the killed worker's sample was re-run, not counted twice
    assert spread.status == "complete" and len(spread.samples) == len(one.samples)


def sleep_then_return(model, seconds: float) -> float:
    """An item that keeps its worker busy (sent to the workers by value, as this module is not on their path)."""
    time.sleep(seconds)
    return seconds


def test_a_worker_killed_in_the_middle_of_an_item_has_it_run_again(head, stories):
    """Both workers are busy with a 3 s item when one is killed through Ray: its item goes to the next free worker,
    every result comes back once, and a replacement joins without holding the others up."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with Workers(TWO, stories) as workers:
        workers.start()
        victim = workers.actors[0]
        killer = threading.Timer(1.0, ray.kill, (victim,), {"no_restart": True})
        killer.start()
        results = list(workers.map(sleep_then_return, stories, [3.0, 3.0, 0.2, 0.2, 0.2]))
        killer.join()
        assert sorted(j for j, _ in results) == [0, 1, 2, 3, 4]
        assert dict(results) == dict(enumerate([3.0, 3.0, 0.2, 0.2, 0.2]))
        assert workers.replaced == 1 and victim not in workers.actors


def test_workers_must_hold_the_drivers_model_and_input_files(head, stories, tmp_path):
    """Another checkpoint at the worker's path, or an input file that differs there: the run fails, saying so."""
    other = tmp_path / "other-stories"
    shutil.copytree(Path(interp.models.alias_path("stories260k")), other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ValueError, match="with config .* the driver config .*give every machine the same model"):
        interp.score(stories, "summary", samples=2, cluster=Cluster(workers=1, model=str(other)))
    file, config_hash = Path(prompts(tmp_path)), model_identity(stories)["config_hash"]
    digests = input_digests({"prompts": str(file)})  # the driver's
    file.write_text("another prompt")  # what a worker finds
    with pytest.raises(ValueError, match="prompts.txt differs from the driver's"):
        same_as_driver(stories, config_hash, digests)
    file.unlink()
    with pytest.raises(ValueError, match="prompts.txt is missing"):
        same_as_driver(stories, config_hash, digests)
    file.write_text("another prompt")
    same_as_driver(stories, config_hash, input_digests({"prompts": str(file)}))  # the same file: scored


def test_workers_that_do_not_start_in_time_fail_the_run(head):
    with pytest.raises(ClusterError, match="did not start and load the model within"):
        interp.score("stories260k", "summary", samples=2, cluster=Cluster(workers=1, start_timeout=0.01))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_driver_killed_mid_run_resumes_on_a_head_started_apart(stories, tmp_path):
    """`ray start --head` as a separate process, joined by address: a driver killed mid-run leaves an incomplete run
    that `interp score --resume --cluster HOST:PORT` finishes, equal to a single-process run."""
    port, file, store = free_port(), prompts(tmp_path), tmp_path / "store"
    ray_bin = str(Path(sys.executable).parent / "ray")
    # --block keeps `ray start` in the foreground: stopping its process group stops this head only (`ray stop` would
    # stop every Ray process of the user, the module's cluster included); its own session folder (short: Ray's
    # sockets live there) keeps any later `ray.init()` from finding it
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    started = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
                                "--num-cpus=2", "--include-dashboard=false", "--block", f"--temp-dir={temp}"],
                               env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    command = [sys.executable, "-m", "interp.cli", "score", "stories260k", "--prompts", file, "--out", str(store),
               "--cluster", f"127.0.0.1:{port}", "--workers", "2", "--json"]
    driver = None
    try:
        driver = subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 150
        while len(list(store.glob("*/parts/sample-*.parquet"))) < 3:
            assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the driver scored nothing in 150 s"
            time.sleep(0.02)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        [run] = Store(store).runs()
        assert run.status == "incomplete" and 3 <= run.progress[0] < 16
        done = subprocess.run([*command, "--resume"], env=env(), capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
    finally:  # nothing this test started outlives it, whatever failed
        if driver is not None and driver.poll() is None:
            driver.kill()
            driver.wait()
        os.killpg(started.pid, signal.SIGTERM)
        try:
            started.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()
        shutil.rmtree(temp, ignore_errors=True)
    [resumed] = json.loads(done.stdout)["runs"]
    assert resumed["id"] == run.id and resumed["status"] == "complete"
    same_tables(interp.score(stories, "summary", prompts=file), interp.open_run(run.id, store))


def test_a_sweep_of_two_models_and_two_analyses(head, tmp_path, capsys):
    copy = tmp_path / "stories-copy"
    shutil.copytree(Path(interp.models.alias_path("stories260k")), copy)
    file = tmp_path / "sweep.toml"
    file.write_text(f'models = ["stories260k", "{copy}"]\nanalyses = ["summary", "sinks"]\n'
                    '[options]\nsamples = 2\n')
    store = tmp_path / "store"
    assert main(["sweep", str(file), "--out", str(store), "--cluster", "ray", "--workers", "2"]) == 0
    first = capsys.readouterr().out
    assert "4 combinations: 4 scored, 0 complete already, 0 failed" in first, first
    runs = Store(store).runs()
    assert len(runs) == 4 and {r.status for r in runs} == {"complete"}
    assert main(["sweep", str(file), "--out", str(store), "--cluster", "ray"]) == 0
    assert "4 combinations: 0 scored, 4 complete already, 0 failed" in capsys.readouterr().out
    assert len(Store(store).runs()) == 4
    result = interp.open_run(next(r.id for r in runs if r.meta["analysis"] == "sinks"
                                  and r.meta["model"]["name"] == "stories260k"), store)
    one = interp.score("stories260k", "sinks", samples=2)
    same_tables(one, result)
    assert result.meta["model"] == one.meta["model"]  # recorded as the workers ran it (cpu), not as the driver's copy


def test_an_atlas_on_the_workers_equals_one_built_in_this_process(head, tmp_path, capsys):
    """`interp atlas --cluster`: every analysis of the quick preset scored on the workers (the driver's copy holds
    no weights), each an ordinary run; the atlas's table equals the atlas of the same runs scored here, bit for bit,
    and a second call reuses every run."""
    store = tmp_path / "store"
    argv = ["atlas", "stories260k", "--out", str(store), "--cluster", "ray", "--workers", "2", "--json"]
    assert main(argv) == 0
    spread = json.loads(capsys.readouterr().out)
    model = interp.load_model("stories260k")  # each analysis alone, as the workers score it (no shared forward)
    one = Atlas(interp.score(model, name, **PRESETS["quick"][name]) for name in spread["runs"])
    assert spread["runs"].keys() == one.runs.keys() == {"summary", "retrieval", "sinks", "taxonomy", "lookback"}
    atlas = interp.open_atlas(spread["id"], store)
    pd.testing.assert_frame_equal(atlas.table(), one.table(), check_exact=True)
    for name, run in spread["runs"].items():
        meta = interp.open_run(run, store).meta
        assert meta["model"]["device"] == "cpu" and meta["analysis"] == name  # as the workers ran it
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == spread["runs"]  # complete runs reused, none rescored
    assert len(Store(store).runs()) == len(spread["runs"]) + 1  # the runs and one atlas entry


def test_the_drivers_copy_of_a_model_the_workers_load_holds_no_weights(tmp_path):
    """Built from the config on the meta device (nothing read or downloaded), with the identity a run records."""
    bare = tmp_path / "config-only"  # a checkpoint folder without its weights file still gives the driver's copy
    shutil.copytree(Path(interp.models.alias_path("stories260k")), bare, ignore=shutil.ignore_patterns("*.safetensors"))
    assert Cluster().driver_model(str(bare)).n_layers() == 5
    for name in ("stories260k", "organism-vit", "organism-llava"):
        model = Cluster(model=name).driver_model(name)
        assert {p.device.type for p in model.hf.parameters()} == {"meta"}, name
        full = interp.load_model(name)
        assert model_identity(model) == {**model_identity(full), "device": "meta"}, name
        assert model.family == full.family and type(model.processor) is type(full.processor), name
    assert interp.load_model("stories260k", weights=False).prepare("Once upon a time")["input_ids"].shape[-1] > 1
    assert Cluster().worker_device() == "cpu" and Cluster(gpus_per_worker=1).worker_device() == "cuda:0"
    assert Cluster(device="cuda:1").worker_device() == "cuda:1"  # as a one-process run on cuda records its model


LOOPBACK_PROBE = """
import json, os, time
import psutil, ray  # Ray imported first: it has read its settings before interp starts a cluster
from interp.cluster import Cluster, Workers
workers = Workers(Cluster("ray", workers=1, model="stories260k"))
workers.start()
me = psutil.Process()
ray_processes = [me, *me.children(recursive=True)]
listening = sorted({c.laddr.ip for p in ray_processes for c in p.net_connections("tcp") if c.status == "LISTEN"})
node = ray._private.worker.global_worker.node.node_ip_address
workers.close()
gone, alive = psutil.wait_procs(ray_processes[1:], timeout=30)
print(json.dumps({"listening": listening, "node": node, "alive": [p.name() for p in alive],
                  "env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"),
                  "constant": ray._private.ray_constants.ENABLE_RAY_CLUSTER, "initialized": ray.is_initialized()}))
"""


def test_a_local_cluster_listens_on_loopback_only_and_stops_with_the_run():
    """--cluster ray in a process that imported Ray before (so Ray's own settings were read already): every socket
    its servers and workers listen on is 127.0.0.1, and closing the workers stops them all."""
    child = {k: v for k, v in env().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    done = subprocess.run([sys.executable, "-c", LOOPBACK_PROBE], env=child, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["listening"] and set(seen["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1"}, seen
    assert seen["node"] == "127.0.0.1" and not seen["initialized"] and seen["alive"] == [], seen
    assert seen["env"] is None and seen["constant"] is True  # a later cluster joined by address sees the real address


def test_sweep_grids_and_bad_files(tmp_path):
    sweep = check_sweep({"models": ["m"], "analyses": ["retrieval", "summary"],
                         "params": {"retrieval": {"lengths": [[100, 200]], "n_needles": [1, 2]}}})
    assert list(sweep.combinations()) == [("m", "retrieval", {"lengths": [100, 200], "n_needles": 1}),
                                    ("m", "retrieval", {"lengths": [100, 200], "n_needles": 2}),
                                    ("m", "summary", {})]
    with pytest.raises(ValueError, match="no parameter lenghts"):
        check_sweep({"models": ["m"], "analyses": ["retrieval"], "params": {"retrieval": {"lenghts": [[1]]}}})
    with pytest.raises(ValueError, match="does not run"):
        check_sweep({"models": ["m"], "analyses": ["summary"], "params": {"sinks": {"epsilon": [0.3]}}})
    with pytest.raises(ValueError, match="models must be"):
        check_sweep({"analyses": ["summary"]})
    (tmp_path / "s.yaml").write_text("models: [stories260k]\nanalyses: [summary]\noptions: {samples: 1}\n")
    assert read_sweep(tmp_path / "s.yaml").options == {"samples": 1}
    (tmp_path / "s.txt").write_text("")
    with pytest.raises(ValueError, match=".toml or .yaml"):
        read_sweep(tmp_path / "s.txt")
    rows = run_sweep(check_sweep({"models": [str(tmp_path / "missing"), "stories260k"], "analyses": ["vhd"]}),
                     tmp_path / "store")
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert "no model folder" in rows[0]["error"] and "does not apply" in rows[1]["error"]


def test_workers_of_a_fraction_of_a_cpu_are_no_more_than_the_cores(head):
    """--cpus-per-worker 0.5 without --workers on the 2-CPU cluster: 2 workers, not 4 (each a copy of the model)."""
    with Workers(Cluster(cpus_per_worker=0.5, model="stories260k")) as workers:
        workers.start()
        assert len(workers.actors) == 2


def test_a_model_a_worker_cannot_load_fails_the_run(head, tmp_path):
    with pytest.raises(ClusterError, match="could not load .*no model folder"):
        interp.score("stories260k", "summary", samples=2,
                     cluster=Cluster(workers=1, model=str(tmp_path / "missing")))
    with pytest.raises(ClusterError, match="holds 2 worker"):
        interp.score("stories260k", "summary", samples=2, cluster=Cluster(workers=3))
    assert main(["score", "stories260k", "--workers", "2"]) == 2  # cluster flags without --cluster
    nobody = f"127.0.0.1:{free_port()}"  # a driver of its own (not joined yet): told at once, not after Ray's retries
    done = subprocess.run([sys.executable, "-m", "interp.cli", "score", "stories260k", "--samples", "1", "--cluster",
                           nobody, "--out", str(tmp_path / "store")], env=env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and f"nothing listens at '{nobody}'" in done.stderr, done.stderr[-2000:]
    with pytest.raises(ClusterError, match="connected to the Ray cluster at .*, not 127.0.0.1:1"):
        interp.score("stories260k", "summary", samples=2, cluster="127.0.0.1:1")  # this process joined `head`
    for same in (head, head.replace("127.0.0.1", "localhost")):  # its own head, however written: used
        assert len(interp.score("stories260k", "summary", samples=1, cluster=same).samples)
