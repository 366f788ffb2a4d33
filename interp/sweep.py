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
workers per model, loaded once for all of its runs); an incomplete run of a combination is resumed.
"""

from __future__ import annotations

import itertools
import os
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from .analyses import get_analysis
from .cluster import Cluster, Workers
from .files import read_text
from .models import load_model
from .progress import QUIET, Progress
from .scoring import completed_run, score
from .store import Store

OPTIONS = ("samples", "max_tokens", "seed", "backend", "layers", "heads")
SWEEP_FILE_LIMIT = 1 << 20


@dataclass
class Sweep:
    """What a sweep file says: models, analyses, run options and each analysis's parameter grid."""

    models: list[str]
    analyses: list[str]
    options: dict = field(default_factory=dict)
    grids: dict[str, dict[str, list]] = field(default_factory=dict)

    def combinations(self) -> list[tuple[str, str, dict]]:
        """(model, analysis, params) for every combination, models outermost (each model's workers load once)."""
        out = []
        for model in self.models:
            for analysis in self.analyses:
                grid = self.grids.get(analysis, {})
                for values in itertools.product(*grid.values()):
                    out.append((model, analysis, dict(zip(grid, values))))
        return out


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
            spec = yaml.safe_load(text)
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


def check_sweep(spec, where: str = "sweep") -> Sweep:
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: a sweep is a table with models, analyses, [options] and [params.ANALYSIS]")
    unknown = set(spec) - {"models", "analyses", "options", "params"}
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; a sweep has models, analyses, "
                         "options and params")
    lists = {}
    for key in ("models", "analyses"):
        value = spec.get(key)
        value = [value] if isinstance(value, str) else value
        if not value or not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ValueError(f"{where}: {key} must be a non-empty list of names")
        lists[key] = list(dict.fromkeys(value))
    for name in lists["analyses"]:
        get_analysis(name)  # an unknown name: its clear error
    options = spec.get("options", {})
    if not isinstance(options, dict) or set(options) - set(OPTIONS):
        raise ValueError(f"{where}: [options] takes {', '.join(OPTIONS)}")
    params = spec.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"{where}: params must be a table of [params.ANALYSIS] grids")
    grids = {}
    for name, grid in params.items():
        if name not in lists["analyses"]:
            raise ValueError(f"{where}: [params.{name}] is for an analysis the sweep does not run "
                             f"({', '.join(lists['analyses'])})")
        if not isinstance(grid, dict):
            raise ValueError(f"{where}: [params.{name}] must be a table of parameter = [values]")
        grids[name] = {key: values if isinstance(values, list) else [values] for key, values in grid.items()}
        empty = [key for key, values in grids[name].items() if not values]
        if empty:
            raise ValueError(f"{where}: [params.{name}] {', '.join(empty)}: give at least one value")
        get_analysis(name).resolve({key: values[0] for key, values in grids[name].items()})  # unknown names refused
    return Sweep(lists["models"], lists["analyses"], dict(options), grids)


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
            for _, analysis, params in runs:
                row = {"model": name, "analysis": analysis, "params": params, "status": "done", "run": None,
                       "samples": None, "seconds": 0.0, "error": None}
                rows.append(row)
                start = time.perf_counter()
                try:
                    done = completed_run(model, analysis, store, cluster=workers, **sweep.options, **params)
                    if done is not None:
                        row.update(status="skipped", run=done.id, samples=done.progress[1])
                        continue
                    result = score(model, analysis, store=store, resume=True, cluster=workers, progress=progress,
                                   **sweep.options, **params)
                    row.update(run=result.id, samples=len(result.meta["plan"]))
                except (ValueError, RuntimeError, OSError) as e:
                    row.update(status="failed", error=f"{type(e).__name__}: {e}")
                row["seconds"] = round(time.perf_counter() - start, 2)
        finally:
            if workers is not None:
                workers.close()
    return rows


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
