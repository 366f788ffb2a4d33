"""Sweeps within bounds, without Ray: a grid's size counted and refused before anything is built, every value of
every grid and every option checked before the first run, YAML duplicate keys refused, two identical sweeps into one
store scoring each combination once, and the default number of a cluster's workers."""

import gc
import threading
import time

import pytest

import interp.sweep
from interp.cluster import Cluster, ClusterError
from interp.store import Store
from interp.sweep import MAX_COMBINATIONS, check_sweep, read_sweep, run_sweep


def test_a_huge_grid_is_counted_and_refused_before_anything_is_built():
    """8 parameters × 30 values: 6.6e11 combinations, refused at once with the count (not built: a MemoryError)."""
    names = ["epsilon", "any_min_queries", "top_activations", "massive_min", "massive_ratio", "norm_threshold",
             "sink_dims"]
    grid = {**{n: list(range(1, 31)) for n in names}, "prompt": [f"prompt {i}" for i in range(30)]}
    spec = {"models": ["m"], "analyses": ["sinks"], "params": {"sinks": grid}}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"656,100,000,000 combinations .* at most {MAX_COMBINATIONS:,}"):
        check_sweep(spec)
    assert time.perf_counter() - start < 5
    sweep = check_sweep({"models": ["a", "b"], "analyses": ["summary", "lookback"],
                         "params": {"lookback": {"offset": list(range(1, 101))}}})
    assert sweep.count() == 2 * (1 + 100)
    combinations = sweep.combinations()
    assert next(combinations) == ("a", "summary", {}) and next(combinations) == ("a", "lookback", {"offset": 1})


@pytest.mark.parametrize("grid, wrong", [
    ({"offset": [1, -1, 2]}, "offset = -1"),
    ({"offset": [1, "x"]}, "offset = 'x'"),
    ({"offset": [1, 2.5]}, "offset = 2.5"),
    ({"offset": [1, {"a": 1}]}, "offset = {'a': 1}"),
])
def test_every_value_of_every_grid_is_checked_before_the_first_run(grid, wrong):
    with pytest.raises(ValueError, match=rf"\[params.lookback\] {wrong}: .*offset"):
        check_sweep({"models": ["m"], "analyses": ["summary", "lookback"], "params": {"lookback": grid}})


@pytest.mark.parametrize("options, wrong", [
    ({"samples": "abc"}, "samples = 'abc'"),
    ({"samples": 0}, "samples = 0: give 1.."),
    ({"samples": [1, 2]}, r"samples = \[1, 2\]"),
    ({"max_tokens": 2.5}, "max_tokens = 2.5"),
    ({"backend": "eager"}, "backend = 'eager': give hf"),
    ({"seed": True}, "seed = True"),
    ({"layers": ["a"]}, r"layers = \['a'\]"),
])
def test_bad_options_are_refused_before_the_first_run(options, wrong):
    with pytest.raises(ValueError, match=rf"\[options\] {wrong}"):
        check_sweep({"models": ["m"], "analyses": ["summary"], "options": options})


def test_options_are_read_as_score_takes_them():
    sweep = check_sweep({"models": ["m"], "analyses": ["summary"],
                         "options": {"samples": "8", "layers": "0,2", "heads": 1, "backend": "hf"}})
    assert sweep.options == {"samples": 8, "layers": [0, 2], "heads": [1], "backend": "hf"}


def test_yaml_duplicate_keys_are_refused_as_in_toml(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "s.yaml").write_text("models: [stories260k]\nanalyses: [summary]\noptions:\n  samples: 1\n"
                                     "  samples: 2\n")
    with pytest.raises(ValueError, match=r"s.yaml: duplicate key 'samples' \(line 5\)"):
        read_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.toml").write_text('models = ["stories260k"]\nanalyses = ["summary"]\n[options]\nsamples = 1\n'
                                     'samples = 2\n')
    with pytest.raises(ValueError, match="Cannot overwrite a value"):
        read_sweep(tmp_path / "s.toml")
    (tmp_path / "ok.yaml").write_text("models: [stories260k]\nanalyses: [summary, lookback]\n"
                                      "params: {lookback: {offset: [1, 2]}}\n")
    assert read_sweep(tmp_path / "ok.yaml").count() == 3


def test_two_identical_sweeps_at_once_score_each_combination_once(tmp_path, monkeypatch):
    """Each sweep claims the combination it scores: the other scores another meanwhile, then finds the first one's
    finished run as a match (skipped), as a re-run of a finished combination does. The two threads built their
    models at once: transformers builds under process-wide switches (weight initialisation off, then on), which
    this left in a state in which a later model gave other (garbage) losses, until building was serialised."""
    def losses():  # taxonomy's next-token losses on repeated random tokens, of a freshly loaded model
        run = interp.score(interp.load_model("stories260k"), "taxonomy", samples=1, half=32, ablate_draws=0)
        return run.tables["ablation"][["loss_first", "loss_repeated"]].to_numpy()

    reference = losses()
    scoring = interp.sweep.score

    def slow_score(*args, **kwargs):  # both sweeps look for a finished run before either has one
        time.sleep(1)
        return scoring(*args, **kwargs)

    monkeypatch.setattr(interp.sweep, "score", slow_score)
    sweep = check_sweep({"models": ["stories260k"], "analyses": ["summary", "lookback"], "options": {"samples": 1},
                         "params": {"lookback": {"offset": [1, 2]}}})
    store = tmp_path / "store"
    start = threading.Barrier(2)
    rows = {}

    def run(name):
        start.wait()
        rows[name] = run_sweep(sweep, store)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    runs = Store(store).runs()
    assert len(runs) == 3 and {r.status for r in runs} == {"complete"}
    for i in range(3):
        a, b = rows["a"][i], rows["b"][i]
        assert sorted([a["status"], b["status"]]) == ["done", "skipped"], (a, b)
        assert a["run"] == b["run"]
    rows.clear()
    gc.collect()  # what the threads built is released here, as it is before the next test
    assert (losses() == reference).all()


def test_the_default_number_of_workers_never_exceeds_the_cores():
    """--cpus-per-worker 0.25 on 2 cores: 2 workers (not 8); GPUs asked for: one per GPU, as far as the CPUs go."""
    two_cores = {"CPU": 2.0}
    assert Cluster(cpus_per_worker=0.25).worker_count(two_cores) == 2
    assert Cluster(cpus_per_worker=0.01).worker_count(two_cores) == 2
    assert Cluster().worker_count(two_cores) == 2 and Cluster(cpus_per_worker=2).worker_count(two_cores) == 1
    assert Cluster(cpus_per_worker=0.1, workers=20).worker_count(two_cores) == 20  # asked for, and they fit
    gpus = {"CPU": 16.0, "GPU": 8.0}
    assert Cluster(gpus_per_worker=1).worker_count(gpus) == 8
    assert Cluster(gpus_per_worker=1, cpus_per_worker=4).worker_count(gpus) == 4
    assert Cluster(gpus_per_worker=0.5).worker_count({"CPU": 16.0, "GPU": 1.0}) == 2
    with pytest.raises(ClusterError, match="holds 0 worker"):
        Cluster(gpus_per_worker=1).worker_count(two_cores)
    with pytest.raises(ClusterError, match="holds 2 worker.*not 3"):
        Cluster(workers=3).worker_count(two_cores)


@pytest.mark.parametrize("options", [{"cpus_per_worker": 0}, {"cpus_per_worker": -1}, {"cpus_per_worker": float("nan")},
                                     {"cpus_per_worker": float("inf")}, {"cpus_per_worker": True},
                                     {"gpus_per_worker": float("nan")}, {"gpus_per_worker": -1}, {"workers": True}])
def test_worker_resources_that_mean_nothing_are_refused(options):
    with pytest.raises(ValueError, match=f"{next(iter(options))}="):
        Cluster(**options)
