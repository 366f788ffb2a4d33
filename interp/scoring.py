"""`interp.score`: run an analysis on a model, sample by sample, into the store (or memory)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import socket
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import torch
import transformers

from interp import __version__
from interp.analyses import ANALYSES, Options, get_analysis
from interp.analyses.inputs import InputChangedError, file_digest, recorded_inputs
from interp.hooks import BACKENDS
from interp.hooks.capture import check_heads, check_layers

from .cluster import Cluster, Workers, as_cluster
from .fanout import LOCAL, Executor, spread_over
from .files import open_regular, read_bytes
from .params import Spec, named_paths
from .models import Model, load_model
from .progress import QUIET, Progress, as_progress
from .results import ScoreResult, as_store
from .store import KEPT_INPUT_LIMIT, RunInfo, RunWriter, Store, StoreError


MAX_SAMPLES = 1_000_000  # far beyond any protocol; a plan is built in memory before any sample runs


def score(
    model: Model | str | os.PathLike,
    analysis: str = "summary",
    *,
    layers: Iterable[int] | None = None,
    heads: Iterable[int] | None = None,
    samples: int | None = None,
    max_tokens: int | None = None,
    backend: str = "hf",
    seed: int = 0,
    store: Store | str | os.PathLike | bool | None = None,
    resume: bool | str = False,
    progress: bool | Progress = False,
    cluster: str | Cluster | Workers | None = None,
    **params,
) -> ScoreResult:
    """Score every head of `model` with one analysis (see `interp.analyses.ANALYSES`).

    model: an `interp.Model`, or anything `load_model` takes. layers / heads: which to score (default all).
    samples, max_tokens, seed: the analysis's sample count, input length and randomness. backend: "hf",
    "transformer-lens" or "nnsight". params: the analysis's own parameters (e.g. `prompts=` for summary).
    store: a store directory (True: the default store) to write the run to; None keeps the result in memory.
    resume: True to finish the newest incomplete run in `store` with the same model, analysis, options and
    parameters (a new run starts when there is none), or a run id to finish that run with its own settings.
    Finished samples are never redone. cluster: score the samples (and finalize's heavy loops) on Ray workers —
    an address ("ray": a local cluster started for the run, "auto", HOST:PORT), an `interp.cluster.Cluster`
    (workers, their resources, what they load) or started `Workers`; this process still writes the run. Returns a
    `ScoreResult`.
    """
    an = get_analysis(analysis)
    bars = as_progress(progress)
    runs = as_store(store) if store is not None and store is not False else None
    if resume and runs is None:
        raise ValueError("resume needs a store to resume from: give store=")
    if runs is not None:
        runs.check_writable()  # before any work
    cluster = as_cluster(cluster, model)
    if not isinstance(model, Model):
        with bars.status(f"loading {model}"):
            spec = cluster.cluster if isinstance(cluster, Workers) else cluster
            model = spec.driver_model(model) if spec is not None and spec.model is not None else load_model(model)
    options, params, identity = _settings(an, model, layers, heads, samples, max_tokens, backend, seed, params, cluster)

    writer: RunWriter | None = None
    if runs is not None and isinstance(resume, str):
        writer = runs.reopen(resume)
        _check_same_model(writer, identity)
        an = get_analysis(writer.meta["analysis"])
        options, params = Options.from_json(writer.meta["options"]), an.stored_params(writer.meta)
    elif runs is not None and resume:
        writer = _reopen_matching(runs, an.name, identity, options, params)
    if writer is not None:
        _check_same_inputs(writer)
    with _executor(cluster, model) as executor:
        writer, plan, meta, created = start_run(an, model, options, params, identity, runs, writer, executor)
        return _run(an, model, options, params, plan, bars, writer=writer, meta=meta, created=created,
                    executor=executor)


def start_run(an, model: Model, options, params: dict, identity: dict, runs: Store | None, writer: RunWriter | None,
              executor: Executor = LOCAL) -> tuple[RunWriter | None, list[dict], dict | None, bool]:
    """(writer, plan, meta, created): a new run planned (and created in the store, when there is one), or the
    reopened `writer` with its plan (meta None, created False). A new run records its input files' digests first,
    and plans with every read checked against them (a plan may fan out forward passes too)."""
    meta, created = None, False
    if writer is None:
        inputs = input_digests(params)
        with recorded_inputs(inputs), spread_over(_checked(executor, identity["config_hash"], inputs)):
            torch.manual_seed(options.seed)
            plan = an.plan(model, options, params)
        scores = an.score_columns(model, params)
        meta = {"analysis": an.name, "scores": scores, "signed": bool(an.signed),
                "sample_columns": {s: an.sample_column(s) for s in scores}, "describe": list(an.describe),
                "model": identity, "options": options.to_json(), "params": params, "inputs": inputs,
                "plan": plan, "versions": versions()}
        if runs is not None:
            writer, created = runs.create(meta, slug=f"{run_slug(identity['name'])}-{an.name}"), True
            try:
                writer.keep_inputs(user_files(params, plan))
                _check_kept(writer, inputs)
            except BaseException:
                writer.discard()
                raise
    else:
        plan = writer.meta["plan"]
    return writer, plan, meta, created


@contextmanager
def _executor(cluster: Cluster | Workers | None, model: Model):
    """Where a run's samples are scored: this process, given Workers, or Workers started (on first use) for it."""
    if cluster is None or isinstance(cluster, Workers):
        yield cluster or LOCAL
        return
    with Workers(cluster, model) as workers:
        yield workers


def _run(an, model: Model, options, params: dict, plan: list[dict], bars: Progress, *,
         writer: RunWriter | None = None, meta: dict | None = None, created: bool = False,
         executor: Executor = LOCAL) -> ScoreResult:
    """Score the plan's samples (those not done yet), then aggregate and finalize. created: the run was created by
    this call, so an error before its first sample removes it (no empty incomplete run is left; an interruption
    keeps it, resumable, as at any other time). executor: where samples and finalize's fanned-out work run (this
    process, or a cluster's workers); whatever runs them, this process alone writes the run, sample by sample. Every
    read of a user file, here or on a worker, is checked against the digests the run recorded at its start: a file
    that changed meanwhile stops the run (InputChangedError), which stays incomplete."""
    scored: dict[int, tuple] = {}
    done = writer.done() if writer is not None else set()
    todo = [i for i in range(len(plan)) if i not in done]
    inner = bars if executor is LOCAL else QUIET  # a worker's own bars would go to its log, not this terminal
    recorded = meta if meta is not None else writer.meta  # its model and inputs, as checked when it began or resumed
    inputs = recorded["inputs"] if "inputs" in recorded else input_digests(params)  # older runs: as they are now
    executor = _checked(executor, recorded["model"]["config_hash"], inputs)
    jobs = [(an.name, plan[i], i, options, params, inner) for i in todo]
    try:
        with recorded_inputs(inputs), spread_over(executor), \
                bars.bar(total=len(plan), desc=f"{an.name}: samples", leave=False) as bar:
            bar.update(len(done))
            for j, (rows, extras) in executor.map(score_one, model, jobs):
                if writer is None:
                    scored[todo[j]] = rows, extras
                else:
                    writer.write_sample(todo[j], rows, extras)
                bar.update(1)
            if writer is None:
                ordered = [scored[i] for i in sorted(scored)]  # a cluster returns them as they finish
                samples = pd.concat([rows for rows, _ in ordered], ignore_index=True)
                extras = {name: pd.concat([e[name] for _, e in ordered if name in e], ignore_index=True)
                          for name in dict.fromkeys(n for _, e in ordered for n in e)}
            else:
                samples, extras = writer.samples(), writer.sample_tables(an.sample_tables)
            heads = an.aggregate(samples, params)
            tables = {**extras, **an.finalize(model, plan, samples, heads, options, params, bars, extras)}
        done_meta = {**(meta if writer is None else writer.meta), "status": "complete", "tables": sorted(tables)}
        report = an.report(ScoreResult(done_meta, heads, samples, None, tables))  # kept: reading needs no analysis
        if writer is None:
            return ScoreResult({**done_meta, "report": report}, heads, samples, None, tables)
        writer.finish(heads, samples, tables, report)
        return ScoreResult(writer.meta, heads, samples, writer.path, tables)
    except BaseException as e:
        if writer is not None:
            stop_run(writer, created, len(plan), e)
        raise
    finally:
        if writer is not None:
            writer.unlock()


def stop_run(writer: RunWriter, created: bool, n_samples: int, error: BaseException) -> None:
    """A run stopped by `error`: removed when this process created it and no sample is done (a device it cannot run
    on, inputs it refuses), else kept incomplete (resumable) with the reason, still locked."""
    if created and not writer.done() and not isinstance(error, KeyboardInterrupt):
        writer.discard()
    else:
        reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        writer.fail(f"{reason} (after {len(writer.done())} of {n_samples} samples)")


def score_one(model: Model, job: tuple) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """One planned sample, scored as every run scores it (here or on a cluster's worker): seeded with seed + its
    index, its per-head rows and per-sample tables tagged with the index. job: (analysis name, planned sample,
    index, Options, params, Progress)."""
    name, sample, i, options, params, progress = job
    torch.manual_seed(options.seed + i)
    return sample_tables(get_analysis(name).score_sample(model, sample, options, params, progress), i)


def sample_tables(scored: pd.DataFrame | dict[str, pd.DataFrame],
                  i: int) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """(per-head rows, per-sample tables) of what `score_sample` returned for sample `i`, each tagged with it."""
    rows, extras = (scored.pop("samples"), scored) if isinstance(scored, dict) else (scored, {})
    for table in (rows, *extras.values()):
        table.insert(0, "sample", i)
    return rows, extras


class _Checked:
    """A cluster's executor whose items run as the driver's: each worker first finds the driver's model and input
    files (`same_as_driver`), then runs the item with every read of a user file checked against the run's digests."""

    def __init__(self, executor: Executor, config_hash: str, inputs: dict[str, str]):
        self.executor, self.driver = executor, (config_hash, inputs)

    def map(self, fn, model, items):
        return self.executor.map(as_driver, model, [(fn, item, self.driver) for item in items])


def _checked(executor: Executor, config_hash: str, inputs: dict[str, str]) -> Executor:
    """`executor` with its items checked as the driver's (`_Checked`); this process's own (LOCAL) reads are checked
    by the `recorded_inputs` block around them."""
    return executor if executor is LOCAL else _Checked(executor, config_hash, inputs)


def as_driver(model: Model, job: tuple):
    """fn(model, item) on a worker that holds the driver's model and input files, each read checked against the
    driver's digests. job: (fn, item, (the model's config hash, {input path: digest}))."""
    fn, item, (config_hash, inputs) = job
    same_as_driver(model, config_hash, inputs)
    with recorded_inputs(inputs):
        return fn(model, item)


_SAME_AS_DRIVER: set = set()  # the (config hash, inputs) this process (a worker) has found to be the driver's


def same_as_driver(model: Model, config_hash: str, inputs: dict[str, str]) -> None:
    """Refuse to score on a worker whose model or input files differ from the driver's (another checkpoint at the
    same path, a haystack edited on one machine): the run would mix them. Checked once per process and run."""
    key = (config_hash, tuple(sorted(inputs.items())))
    if key in _SAME_AS_DRIVER:
        return
    where = f"worker {socket.gethostname()} (pid {os.getpid()})"
    mine = model_identity(model)["config_hash"]
    if mine != config_hash:
        raise ValueError(f"{where} loaded {model.name} with config {mine}, the driver config {config_hash}: give "
                         "every machine the same model")
    for path, digest in inputs.items():
        here = Path(path).expanduser()
        if not here.exists() or _digest(here) != digest:
            what = "is missing" if not here.exists() else "differs from the driver's"
            raise ValueError(f"{where}: {path} {what}; every machine reads a run's input files at the same path (copy "
                             "them there, or put them on a shared file system)")
    _SAME_AS_DRIVER.add(key)


def _settings(an, model: Model, layers, heads, samples, max_tokens, backend, seed, params,
              cluster: Cluster | Workers | None = None) -> tuple[Options, dict, dict]:
    """(Options, the full parameters, the model's identity) of a run, checked: what a run records and is matched by.
    A driver's copy without weights (on the meta device) records the device of the cluster's workers. Parameters are
    checked first (they are wrong whatever the model), then the model, then the files given to parameters the
    analysis does not read for it."""
    params = an.resolve(params)
    an.check(model)
    an.check_paths(model, params)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples={samples}: give 1..{MAX_SAMPLES:,}")
    tower = model.family.primary
    options = Options(
        layers=None if layers is None else tuple(check_layers(model, tower, layers)),
        heads=None if heads is None else tuple(int(h) for h in check_heads(model, tower, heads)),
        samples=samples, max_tokens=max_tokens, backend=backend, seed=seed)
    identity = model_identity(model)
    if model.device.type == "meta" and cluster is not None:
        identity["device"] = (cluster if isinstance(cluster, Cluster) else cluster.cluster).worker_device()
    return options, params, identity


def completed_run(model: Model, analysis: str, store: Store | str | os.PathLike, *, layers=None, heads=None,
                  samples=None, max_tokens=None, backend: str = "hf", seed: int = 0, cluster=None,
                  **params) -> RunInfo | None:
    """The newest complete run in `store` that `score` with these arguments (and `cluster`) would repeat (same model,
    analysis, options and parameters), or None."""
    an = get_analysis(analysis)
    options, params, identity = _settings(an, model, layers, heads, samples, max_tokens, backend, seed, params,
                                          cluster)
    return next(_matching(as_store(store), "complete", an.name, identity, options, params), None)


def _matching(runs: Store, status: str, analysis: str, identity: dict, options, params: dict):
    """The runs with this status and the same analysis, model, options and parameters, newest first."""
    for info in runs.runs():
        m = info.meta
        if info.status != status or m["analysis"] != analysis or m["model"] != identity or _params_of(m) != params:
            continue
        try:
            if Options.from_json(m["options"]) == options:
                yield info
        except TypeError:  # options of another version
            continue


def _params_of(meta: dict) -> dict | None:
    """A stored run's parameters as this version resolves them (old names upgraded, user files absolute, values
    typed), so that runs written before a parameter changed still match; None when they no longer resolve."""
    try:
        an = get_analysis(meta["analysis"])
        return an.resolve(an.stored_params(meta))
    except (ValueError, TypeError):
        return None


def _reopen_matching(runs: Store, analysis: str, identity: dict, options, params: dict) -> RunWriter | None:
    """The newest incomplete, unlocked run of the same analysis, model, options and parameters."""
    for info in _matching(runs, "incomplete", analysis, identity, options, params):
        try:
            return runs.reopen(info.id)
        except StoreError:  # taken / finished meanwhile
            continue
    return None


def input_digests(params: dict) -> dict[str, str]:
    """{path: digest} of every file or folder a path parameter (`Spec.path`) names, and of each file in such a
    folder (by its resolved path): what a run records at its start, checks every read against, and what a resumed
    run or a cluster's worker must find unchanged. Other parameters are never taken for paths, whatever their text.
    ValueError naming the parameter ("cannot read prompts from ...") for a path that is missing, or neither a regular
    file nor a folder."""
    specs = _path_specs()
    digests = {}
    for name, value in params.items():
        for path in named_paths(specs[name], value) if name in specs else []:
            here = Path(path).expanduser()
            try:
                digests[path] = _digest(here)
                if here.is_dir():
                    digests.update({str(f.resolve()): _digest(f.resolve()) for f in _files(here)})
            except FileNotFoundError:
                builtin = f" (nor one of: {', '.join(specs[name].builtin)})" if specs[name].builtin else ""
                raise ValueError(f"cannot read {name} from {path}: no such file or folder{builtin}") from None
            except OSError as e:  # not a regular file, unreadable
                raise ValueError(f"cannot read {name} from {path}: {e.strerror or e}") from None
    return digests


def _path_specs() -> dict[str, Spec]:
    """Every analysis's path parameters, by name (a name means the same in every analysis that declares it)."""
    return {name: spec for a in ANALYSES.values() for name, (spec, _, _) in a.Params.specs().items() if spec.path}


def user_files(params: dict, plan: list[dict]) -> list[str]:
    """The user's files a run reads, as recorded: those its path parameters name (not folders) and the plan's images
    (samples' "image" / "images" entries that are paths)."""
    specs = _path_specs()
    files = [path for name, value in params.items() if name in specs
             for path in named_paths(specs[name], value) if Path(path).expanduser().is_file()]
    for sample in plan:
        images = sample.get("image", sample.get("images"))
        files += [i for i in (images if isinstance(images, list) else [images]) if isinstance(i, str)]
    return files


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _digest(path: Path) -> str:
    """A file's `file_digest` (read in blocks), or a folder's: sha256 over its files, by name."""
    h = hashlib.sha256()
    for file in _files(path) if path.is_dir() else [path]:
        h.update(file.name.encode() + b"\0")
        with open_regular(file, 1 << 40) as f:  # a FIFO would never end
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check_kept(writer: RunWriter, inputs: dict[str, str]) -> None:
    """Refuse a run whose kept copy of an input differs from the digest recorded before planning (the file changed
    in between)."""
    for recorded, name in writer.meta.get("kept_inputs", {}).items():
        digest = inputs.get(recorded)
        kept = read_bytes(writer.path / name, KEPT_INPUT_LIMIT) if digest is not None else None
        if kept is not None and file_digest(Path(recorded).name, kept) != digest:
            raise InputChangedError(f"{recorded} changed while the run started: start it again")


def _check_same_inputs(writer: RunWriter) -> None:
    """Refuse to resume a run whose input files changed since it started (it would mix two inputs)."""
    for path, digest in writer.meta.get("inputs", {}).items():  # runs written before this was recorded: unchecked
        now = _digest(Path(path).expanduser()) if Path(path).expanduser().exists() else None
        if now != digest:
            writer.unlock()
            what = "is gone" if now is None else "changed"
            raise StoreError(f"{path} {what} since run {writer.id} started: resuming would mix two inputs; restore "
                             "it, or start a new run (without --resume)")


def _check_same_model(writer: RunWriter, identity: dict) -> None:
    recorded = writer.meta["model"]
    if (recorded.get("name"), recorded.get("config_hash")) != (identity["name"], identity["config_hash"]):
        writer.unlock()
        raise StoreError(f"run {writer.id} was made with {recorded.get('name')} (config {recorded.get('config_hash')}), "
                         f"not {identity['name']} (config {identity['config_hash']}): resume it with that model")


def model_identity(model: Model) -> dict:
    """What a run records about its model: name, family, class, config hash, sizes, dtype, device."""
    config = model.config.to_dict()
    for key in ("_name_or_path", "name_or_path", "transformers_version", "dtype", "torch_dtype"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    n_heads, n_kv = model.head_counts()
    return {"name": model.name, "family": model.family.name, "model_type": model.config.model_type,
            "class": type(model.hf).__name__, "config_hash": digest, "n_layers": model.n_layers(),
            "n_heads": n_heads, "n_kv_heads": n_kv, "dtype": str(next(model.hf.parameters()).dtype).removeprefix("torch."),
            "device": str(model.device)}


def versions() -> dict:
    return {"interp": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def open_work(model, store, progress) -> tuple[Model, Store, Progress]:
    """What scoring several runs into a store needs first: the model (loaded, with a status line, unless already an
    `interp.Model`), the store (checked writable before any work) and the progress bars."""
    bars, runs = as_progress(progress), as_store(store)
    runs.check_writable()
    if not isinstance(model, Model):
        with bars.status(f"loading {model}"):
            model = load_model(model)
    return model, runs, bars


def run_slug(name: str) -> str:
    """A model name fit for a directory name: the last path part, other characters as dashes."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:40] or "model"
