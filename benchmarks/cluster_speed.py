"""Runs on Ray against one process: samples per second with 1 and 2 workers, and the driver's cost per sample.

    python benchmarks/cluster_speed.py [--summary-samples 16] [--repeats 2]

A local Ray cluster (127.0.0.1, as many CPUs as the machine has) is started here. Every run writes to a store in a
temporary folder, as a real run does. Workers are started and warmed before timing (their start is printed apart).
Measured: a `summary` run (stories260k, one sample = one prompt) and a `retrieval` run (stories260k, 6 NIAH samples,
masking test off, so that only the sample loop is timed), each in one process (with torch's default threads, and with 1 thread as a
worker has) and with 1 and 2 workers (1 CPU each); the driver's cost per sample, as the extra wall time of a 1-worker
run over the 1-thread single-process run per sample, and as the round trip of an empty item plus writing a part. The last table is arithmetic from those measurements, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # the local cluster on 127.0.0.1
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

import interp  # noqa: E402
from interp.cluster import Cluster, Workers  # noqa: E402


def nothing(model, item):
    """An empty item: what handing one to a worker and getting its answer costs."""
    return item


RUNS = {
    "summary": lambda n: {"samples": n},
    "retrieval": lambda n: {"lengths": [200, 300], "depths": [0, 50, 100], "n_needles": 1, "mask_k": [0]},
}


def timed(model, analysis: str, params: dict, cluster, repeats: int) -> tuple[float, int]:
    """(best wall seconds over repeats, samples) of one run into a fresh store."""
    best, n = float("inf"), 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as store:
            start = time.perf_counter()
            result = interp.score(model, analysis, store=store, cluster=cluster, **params)
            best = min(best, time.perf_counter() - start)
            n = len(result.meta["plan"])
    return best, n


def write_cost(model, repeats: int = 50) -> float:
    """Seconds the driver spends writing one summary sample's part (what it does for every sample, cluster or not)."""
    rows = interp.score(model, "summary", samples=1).samples
    with tempfile.TemporaryDirectory() as root:
        writer = interp.Store(root).create({"analysis": "summary", "model": {"name": "x"}, "options": {}, "params": {},
                                            "plan": [{}]}, slug="bench")
        start = time.perf_counter()
        for i in range(repeats):
            writer.write_sample(i, rows)
        writer.unlock()
        return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--summary-samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    model = interp.load_model("stories260k")
    print(f"machine: {os.cpu_count()} CPUs; torch threads: {torch.get_num_threads()} in one process, 1 per worker; "
          f"Ray {ray.__version__}")
    runs = {analysis: params(args.summary_samples) for analysis, params in RUNS.items()}
    times = {analysis: {"one": timed(model, analysis, p, None, args.repeats)} for analysis, p in runs.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker of 1 CPU runs: the same work, without Ray
    for analysis, p in runs.items():
        times[analysis]["one-1"] = timed(model, analysis, p, None, args.repeats)
    torch.set_num_threads(threads)
    for n in (1, 2):
        with Workers(Cluster(workers=n, model="stories260k")) as workers:
            start = time.perf_counter()
            workers.start()
            print(f"{n} worker(s) started and loaded the model in {time.perf_counter() - start:.1f} s")
            for analysis, p in runs.items():
                interp.score(model, analysis, cluster=workers, **{**p, "samples": 2})  # warm: first calls cache
                times[analysis][n] = timed(model, analysis, p, workers, args.repeats)
            if n == 1:
                items = list(range(200))
                start = time.perf_counter()
                list(workers.map(nothing, None, items))
                trip = (time.perf_counter() - start) / len(items)
    write = write_cost(model)
    print(f"driver, per sample: round trip of an empty item {1000 * trip:.2f} ms, writing a summary part "
          f"{1000 * write:.2f} ms")

    print(f"\n{'run':<10} {'samples':>7} {f'1 proc ({threads} thr)':>15} {'1 proc (1 thr)':>15} {'1 worker':>10} "
          f"{'2 workers':>10} {'2w / 1 proc':>11} {'2w / 1w':>8} {'driver cost / sample':>21}")
    for analysis, t in times.items():
        (one, n), (one1, _), (t1, _), (t2, _) = t["one"], t["one-1"], t[1], t[2]
        print(f"{analysis:<10} {n:>7} {n / one:>13.2f}/s {n / one1:>13.2f}/s {n / t1:>8.2f}/s {n / t2:>8.2f}/s "
              f"{one / t2:>10.2f}x {t1 / t2:>7.2f}x {1000 * (t1 - one1) / n:>18.1f} ms")
    print("(driver cost / sample: the 1-worker run's wall time minus the 1-thread single-process run's, per sample)")

    c = trip + write
    print("\nExpected on N GPUs (arithmetic from the numbers above, not measured): one worker per GPU, each scoring "
          "a sample in t (the 1-worker time per sample here, as if a GPU took as long), the driver handing out and "
          f"writing samples one at a time at c = {1000 * c:.1f} ms: samples/s = min(N / t, 1 / c).")
    print(f"{'run':<10} {'t / sample':>10} " + " ".join(f"{f'N={g}':>9}" for g in GPUS))
    for analysis, t in times.items():
        per = t[1][0] / t[1][1]
        print(f"{analysis:<10} {1000 * per:>7.1f} ms " + " ".join(f"{min(g / per, 1 / c):>7.1f}/s" for g in GPUS))
    ray.shutdown()


GPUS = (1, 2, 4, 8, 16, 64)


if __name__ == "__main__":
    main()
