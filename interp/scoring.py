"""`interp.score`: run an analysis on a model, sample by sample, into the store (or memory)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import torch
import transformers

from interp import __version__
from interp.analyses import Options, get_analysis
from interp.hooks import BACKENDS
from interp.hooks.capture import check_heads, check_layers

from .files import check_regular
from .models import Model, load_model
from .progress import QUIET, Progress
from .results import ScoreResult, as_store
from .store import RunWriter, Store, StoreError


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
    **params,
) -> ScoreResult:
    """Score every head of `model` with one analysis (see `interp.analyses.ANALYSES`).

    model: an `interp.Model`, or anything `load_model` takes. layers / heads: which to score (default all).
    samples, max_tokens, seed: the analysis's sample count, input length and randomness. backend: "hf",
    "transformer-lens" or "nnsight". params: the analysis's own parameters (e.g. `prompts=` for summary).
    store: a store directory (True: the default store) to write the run to; None keeps the result in memory.
    resume: True to finish the newest incomplete run in `store` with the same model, analysis, options and
    parameters (a new run starts when there is none), or a run id to finish that run with its own settings.
    Finished samples are never redone. Returns a `ScoreResult`.
    """
    an = get_analysis(analysis)
    bars = progress if isinstance(progress, Progress) else Progress(progress) if progress else QUIET
    runs = as_store(store) if store is not None and store is not False else None
    if resume and runs is None:
        raise ValueError("resume needs a store to resume from: give store=")
    if runs is not None:
        runs.check_writable()  # before any work
    if not isinstance(model, Model):
        with bars.status(f"loading {model}"):
            model = load_model(model)
    an.check(model)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if samples is not None and not 1 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples={samples}: give 1..{MAX_SAMPLES:,}")
    tower = model.family.primary
    options = Options(
        layers=None if layers is None else tuple(check_layers(model, tower, layers)),
        heads=None if heads is None else tuple(int(h) for h in check_heads(model, tower, heads)),
        samples=samples, max_tokens=max_tokens, backend=backend, seed=seed)
    params = an.resolve(params)
    identity = model_identity(model)

    writer: RunWriter | None = None
    if runs is not None and isinstance(resume, str):
        writer = runs.reopen(resume)
        _check_same_model(writer, identity)
        an = get_analysis(writer.meta["analysis"])
        options, params = Options.from_json(writer.meta["options"]), an.Params.upgrade(writer.meta["params"])
    elif runs is not None and resume:
        writer = _reopen_matching(runs, an.name, identity, options, params)
    if writer is not None:
        _check_same_inputs(writer)
    if writer is None:
        torch.manual_seed(seed)
        plan = an.plan(model, options, params)
        scores = an.score_columns(model, params)
        meta = {"analysis": an.name, "scores": scores, "signed": bool(an.signed),
                "sample_columns": {s: an.sample_column(s) for s in scores}, "describe": list(an.describe),
                "model": identity, "options": options.to_json(), "params": params, "inputs": input_digests(params),
                "plan": plan, "versions": versions()}
        if runs is None:
            return _run(an, model, options, params, plan, bars, meta=meta)
        writer = runs.create(meta, slug=f"{_slug(identity['name'])}-{an.name}")
        try:
            writer.keep_inputs(user_files(params, plan))
        except BaseException:
            writer.discard()
            raise
        return _run(an, model, options, params, plan, bars, writer=writer, created=True)
    return _run(an, model, options, params, writer.meta["plan"], bars, writer=writer)


def _run(an, model: Model, options, params: dict, plan: list[dict], bars: Progress, *,
         writer: RunWriter | None = None, meta: dict | None = None, created: bool = False) -> ScoreResult:
    """Score the plan's samples (those not done yet), then aggregate and finalize. created: the run was created by
    this call, so an error before its first sample removes it (no empty incomplete run is left; an interruption
    keeps it, resumable, as at any other time)."""
    frames, extra_frames = [], {}
    done = writer.done() if writer is not None else set()
    try:
        for i in bars.bar(range(len(plan)), desc=f"{an.name}: samples", total=len(plan), leave=False):
            if i in done:
                continue
            torch.manual_seed(options.seed + i)
            rows = an.score_sample(model, plan[i], options, params, bars)
            rows, extras = (rows.pop("samples"), rows) if isinstance(rows, dict) else (rows, {})
            for table in (rows, *extras.values()):
                table.insert(0, "sample", i)
            if writer is None:
                frames.append(rows)
                for name, table in extras.items():
                    extra_frames.setdefault(name, []).append(table)
            else:
                writer.write_sample(i, rows, extras)
        samples = pd.concat(frames, ignore_index=True) if writer is None else writer.samples()
        extras = ({name: pd.concat(f, ignore_index=True) for name, f in extra_frames.items()} if writer is None
                  else writer.sample_tables(an.sample_tables))
        heads = an.aggregate(samples, params)
        tables = {**extras, **an.finalize(model, plan, samples, heads, options, params, bars, extras)}
        done_meta = {**(meta if writer is None else writer.meta), "status": "complete", "tables": sorted(tables)}
        report = an.report(ScoreResult(done_meta, heads, samples, None, tables))  # kept: reading needs no analysis
        if writer is None:
            return ScoreResult({**done_meta, "report": report}, heads, samples, None, tables)
        writer.finish(heads, samples, tables, report)
        return ScoreResult(writer.meta, heads, samples, writer.path, tables)
    except BaseException as e:
        if writer is not None and created and not writer.done() and not isinstance(e, KeyboardInterrupt):
            writer.discard()  # an error before any sample (a device it cannot run on, inputs it refuses)
        elif writer is not None:
            reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
            writer.fail(f"{reason} (after {len(writer.done())} of {len(plan)} samples)")
        raise
    finally:
        if writer is not None:
            writer.unlock()


def _reopen_matching(runs: Store, analysis: str, identity: dict, options, params: dict) -> RunWriter | None:
    """The newest incomplete, unlocked run of the same analysis, model, options and parameters."""
    for info in runs.runs():
        m = info.meta
        if info.status != "incomplete" or m["analysis"] != analysis or m["model"] != identity or m["params"] != params:
            continue
        try:
            if Options.from_json(m["options"]) != options:
                continue
            return runs.reopen(info.id)
        except (TypeError, StoreError):  # options of another version, or taken / finished meanwhile
            continue
    return None


def input_digests(params: dict) -> dict[str, str]:
    """{path: sha256} of every file (or folder: its files, by name) a parameter names, as "path" or "a,b": what a
    resumed run must find unchanged."""
    return {path: _digest(Path(path).expanduser()) for path in _named_paths(params)}


def _named_paths(params: dict) -> list[str]:
    """The existing files and folders the parameters name (a value "path", or a part of "a,b"), as written."""
    parts = [part.strip() for value in params.values() if isinstance(value, str) for part in value.split(",")]
    return [part for part in dict.fromkeys(parts) if part and os.path.exists(os.path.expanduser(part))]  # no OSError


def user_files(params: dict, plan: list[dict]) -> list[str]:
    """The user's files a run reads, as recorded: those its parameters name (not folders) and the plan's images
    (samples' "image" / "images" entries that are paths)."""
    files = [path for path in _named_paths(params) if Path(path).expanduser().is_file()]
    for sample in plan:
        images = sample.get("image", sample.get("images"))
        files += [i for i in (images if isinstance(images, list) else [images]) if isinstance(i, str)]
    return files


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        check_regular(file, 1 << 40)  # a FIFO would never end
        h.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


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


def _slug(name: str) -> str:
    """A model name fit for a directory name: the last path part, other characters as dashes."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name.rstrip("/").rsplit("/", 1)[-1]).strip("-.")[:40] or "model"
