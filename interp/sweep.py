"""`interp sweep FILE`: one run per model × analysis × parameter combination, into one store, skipping the
combinations already complete there.

A sweep file (TOML; YAML with the same keys):

    models = ["stories260k", "/models/step-1000", "/models/step-2000"]
    analyses = ["summary", "retrieval"]

    [options]                  # every run's options (as `interp score`): samples, max_tokens, seed, backend, layers, heads
    samples = 8

    [params.retrieval]         # an analysis's parameter grid: each value is the list of values to sweep over,
    lengths = [[1000, 2000]]   # so a list-valued parameter is written inside one; a scalar stands for itself
    n_needles = [1, 3]

Runs are scored one after another, each spread over the cluster's workers when a cluster is given (one set of
workers per model, loaded once for all of its runs); an incomplete run of a combination is resumed. A sweep holds
each combination it scores (`Store.claim`): a second sweep into the same store scores the others meanwhile, then
waits for it and finds its finished run, so no combination is scored twice. A sweep file is checked whole before
the first run: every value of every grid, the options, and its size (at most MAX_COMBINATIONS runs).
"""

from __future__ import annotations

import itertools
import math
import os
import time
import tomllib
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from .analyses import get_analysis
from .cluster import Cluster, Workers
from .files import read_text
from .hooks import BACKENDS
from .models import load_model
from .params import parse
from .progress import QUIET, Progress
from .scoring import MAX_SAMPLES, completed_run, model_identity, score
from .store import Store

OPTIONS = {"samples": int, "max_tokens": int, "seed": int, "backend": str, "layers": list[int], "heads": list[int]}
SWEEP_FILE_LIMIT = 1 << 20
MAX_COMBINATIONS = 100_000  # runs one sweep may ask for: a typo'd grid is refused, not expanded


@dataclass
class Sweep:
    """What a sweep file says: models, analyses, run options and each analysis's parameter grid."""

    models: list[str]
    analyses: list[str]
    options: dict = field(default_factory=dict)
    grids: dict[str, dict[str, list]] = field(default_factory=dict)

    def count(self) -> int:
        """How many combinations there are, counted without listing them."""
        return len(self.models) * sum(math.prod(len(values) for values in self.grids.get(analysis, {}).values())
                                      for analysis in self.analyses)

    def combinations(self) -> Iterator[tuple[str, str, dict]]:
        """(model, analysis, params) for every combination, one at a time, models outermost (each model's workers
        load once)."""
        for model in self.models:
            for analysis in self.analyses:
                grid = self.grids.get(analysis, {})
                for values in itertools.product(*grid.values()):
                    yield model, analysis, dict(zip(grid, values))


def read_sweep(path: str | os.PathLike) -> Sweep:
    """A sweep file, checked (names of analyses and parameters, types), with clear errors."""
    path = Path(path).expanduser()
    try:
        text = read_text(path, SWEEP_FILE_LIMIT)
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the sweep file {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            try:
                import yaml  # PyYAML, in the optional `cluster` extra: YAML sweep files only
            except ImportError:
                raise ValueError(f"{path}: YAML sweep files need PyYAML (pip install 'interp[cluster]'); or write "
                                 "the sweep as TOML") from None
            spec = yaml.load(text, Loader=_unique_keys_loader(yaml))
        elif path.suffix == ".toml":
            spec = tomllib.loads(text)
        else:
            raise ValueError(f"{path}: give a .toml or .yaml sweep file")
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # yaml.YAMLError, without importing yaml for TOML files
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"{path}: {e}") from e
        raise
    return check_sweep(spec, str(path))


def _unique_keys_loader(yaml) -> type:
    """PyYAML's safe loader, refusing a key given twice in one mapping (as TOML does) instead of keeping the last."""

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own error follows
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        problem=f"duplicate key {key!r} (line {key_node.start_mark.line + 1}): give each key once")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return Loader


def check_sweep(spec, where: str = "sweep") -> Sweep:
    """A sweep checked whole: names, options, its size (at most MAX_COMBINATIONS), and every value of every grid as
    its analysis's parameters type and bound it; ValueError naming what is wrong otherwise."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a sweep is a table with models, analyses, [options] and [params.ANALYSIS]")
    unknown = set(spec) - {"models", "analyses", "options", "params"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; a sweep has models, "
                         "analyses, options and params")
    lists = {}
    for key in ("models", "analyses"):
        value = spec.get(key)
        value = [value] if isinstance(value, str) else value
        if not value or not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{where}: {key} must be a non-empty list of names")
        lists[key] = list(dict.fromkeys(value))
    for name in lists["analyses"]:
        get_analysis(name)  # an unknown name: its clear error
    options = _check_options(spec.get("options", {}), where)
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a table of [params.ANALYSIS] grids")
    grids = {}
    for name, grid in params.items():
        if name not in lists["analyses"]:
            raise ValueError(f"{where}: [params.{name}] is for an analysis the sweep does not run "
                             f"({', '.join(lists['analyses'])})")
        if not isinstance(grid, dict) or not all(isinstance(key, str) for key in grid):
            raise ValueError(f"{where}: [params.{name}] must be a table of parameter = [values]")
        grids[name] = {key: values if isinstance(values, list) else [values] for key, values in grid.items()}
        empty = [key for key, values in grids[name].items() if not values]
        if empty:
            raise ValueError(f"{where}: [params.{name}] {', '.join(empty)}: give at least one value")
    sweep = Sweep(lists["models"], lists["analyses"], options, grids)
    if sweep.count() > MAX_COMBINATIONS:
        raise ValueError(f"{where}: {sweep.count():,} combinations (models × analyses × parameter values); a sweep "
                         f"runs at most {MAX_COMBINATIONS:,}: give fewer values, or split it into several sweeps")
    for name, grid in grids.items():
        _check_grid(name, grid, where)
    return sweep


def _check_options(options, where: str) -> dict:
    """[options] as `score` takes them: whole numbers in range, a known backend, layers / heads as lists of indices."""
    if not isinstance(options, dict) or set(options) - set(OPTIONS):
        raise ValueError(f"{where}: [options] takes {', '.join(OPTIONS)}")
    out = {}
    for key, value in options.items():
        try:
            out[key] = parse(OPTIONS[key], value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: [options] {key} = {value!r}: {e}") from None
    accepted = {"samples": f"1..{MAX_SAMPLES:,}", "max_tokens": "at least 1", "backend": ", ".join(BACKENDS),
                "layers": "some layer indices", "heads": "some head indices"}
    wrong = [key for key, bad in (("samples", not 1 <= out.get("samples", 1) <= MAX_SAMPLES),
                                  ("max_tokens", out.get("max_tokens", 1) < 1),
                                  ("backend", out.get("backend", "hf") not in BACKENDS),
                                  ("layers", out.get("layers") == []), ("heads", out.get("heads") == [])) if bad]
    if wrong:
        raise ValueError(f"{where}: [options] {wrong[0]} = {options[wrong[0]]!r}: give {accepted[wrong[0]]}")
    return out


def _check_grid(name: str, grid: dict[str, list], where: str) -> None:
    """Every value of an analysis's grid resolved as its parameter (beside the first value of each other one)."""
    firsts = {key: values[0] for key, values in grid.items()}
    for key, values in grid.items():
        for value in values:
            try:
                get_analysis(name).resolve({**firsts, key: value})
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}: [params.{name}] {key} = {value!r}: {e}") from None


def run_sweep(sweep: Sweep, store: Store | str | os.PathLike | None = None, *, cluster: Cluster | None = None,
              loading: dict | None = None, progress: Progress = QUIET) -> list[dict]:
    """Score every combination not yet complete in `store` (on `cluster`'s workers, or in this process, the models
    loaded with `loading`: load_model's dtype, device, trust_remote_code); one row per combination: model, analysis,
    params, status ("done", "skipped": complete already, "failed"), run id, samples, seconds, error. A failed
    combination does not stop the others."""
    store = store if isinstance(store, Store) else Store(store)
    store.check_writable()
    rows = []
    for name, runs in itertools.groupby(sweep.combinations(), key=lambda c: c[0]):
        try:
            with progress.status(f"loading {name}"):
                model = cluster.driver_model(name) if cluster is not None else load_model(name, **(loading or {}))
        except (ValueError, OSError) as e:  # a model that cannot be loaded fails its combinations, not the sweep
            rows += [{"model": name, "analysis": analysis, "params": params, "status": "failed", "run": None,
                      "samples": None, "seconds": 0.0, "error": f"{type(e).__name__}: {e}"} for _, analysis, params in runs]
            continue
        workers = Workers(replace(cluster, model=name), model) if cluster is not None else None  # started when used
        try:
            held = []  # rows of the combinations another process was scoring: waited for after the others
            for _, analysis, params in runs:
                row = {"model": name, "analysis": analysis, "params": params, "status": "done", "run": None,
                       "samples": None, "seconds": 0.0, "error": None}
                rows.append(row)
                if not score_combination(row, model, sweep.options, store, workers, progress, wait=False):
                    held.append(row)
            for row in held:
                score_combination(row, model, sweep.options, store, workers, progress, wait=True)
        finally:
            if workers is not None:
                workers.close()
    return rows


def score_combination(row: dict, model, options: dict, store: Store, workers: Workers | None, progress: Progress,
                      wait: bool) -> bool:
    """Score the row's combination into `store` while holding its claim, unless a complete run of it is there
    already (then the row is "skipped", with that run); the row says what happened. False, with nothing done, when
    another process holds the claim; with `wait`, that process is waited for first."""
    analysis, params = row["analysis"], row["params"]
    start = time.perf_counter()
    try:
        identity = model_identity(model)
        if workers is not None:  # the driver's copy is on the meta device: a run records the workers' device
            identity["device"] = workers.cluster.worker_device()
        combination = {"analysis": analysis, "model": identity, "options": options,
                       "params": get_analysis(analysis).resolve(params)}
        if wait:
            shown = " ".join(f"{k}={v}" for k, v in params.items())
            with progress.status(f"waiting for another process scoring {analysis} {shown}"), \
                    store.claim(combination, wait=True):
                pass  # it has finished (or stopped): the claim is free
        with store.claim(combination, wait=wait) as mine:
            if not mine:
                return False
            done = completed_run(model, analysis, store, cluster=workers, **options, **params)
            if done is not None:
                row.update(status="skipped", run=done.id, samples=done.progress[1])
            else:
                result = score(model, analysis, store=store, resume=True, cluster=workers, progress=progress,
                               **options, **params)
                row.update(run=result.id, samples=len(result.meta["plan"]))
    except (ValueError, RuntimeError, OSError) as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}")
    row["seconds"] = round(time.perf_counter() - start, 2)
    return True


def summary_lines(rows: list[dict]) -> list[str]:
    """The sweep's summary table, one line per combination."""
    shown = [{**r, "params": " ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"} for r in rows]
    width = {key: max([len(key), *(len(str(r[key])) for r in shown)]) for key in ("model", "analysis", "params")}
    lines = [f"{'model':<{width['model']}}  {'analysis':<{width['analysis']}}  {'params':<{width['params']}}  "
             f"{'status':<8} {'samples':>7} {'seconds':>8}  run"]
    for r in shown:
        lines.append(f"{r['model']:<{width['model']}}  {r['analysis']:<{width['analysis']}}  "
                     f"{r['params']:<{width['params']}}  {r['status']:<8} {r['samples'] or '-':>7} {r['seconds']:>8.1f}  "
                     f"{r['run'] or r['error']}")
    counts = {s: sum(r["status"] == s for r in rows) for s in ("done", "skipped", "failed")}
    lines.append(f"{len(rows)} combinations: {counts['done']} scored, {counts['skipped']} complete already, "
                 f"{counts['failed']} failed")
    return lines
