"""`score_together`: several analyses of one model, one forward pass per distinct input (issue 30).

Each analysis still writes its own ordinary run (the run directory, tables and results `score` writes; resumable;
a complete run with the same settings reused). Where samples of different runs feed the model the same inputs (the
same input_ids, and the same backend, layers and heads), one forward serves them all: the analyses' parts of the
pass (`Analysis.sample_pass`) run together (`interp.hooks.run_passes`), with the union of their statistics requests.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass

import torch

from interp.analyses import Options, get_analysis
from interp.analyses.base import Analysis
from interp.analyses.inputs import recorded_inputs
from interp.hooks import run_passes
from interp.hooks.shared import same_inputs

from .models import Model
from .progress import Progress
from .scoring import (_check_same_inputs, _matching, _reopen_matching, _run, _settings, input_digests, model_identity,
                      open_work, sample_tables, start_run, stop_run)
from .store import RunWriter, Store


@dataclass
class _Job:
    """One analysis's run in a `score_together` call: its settings, and its writer and plan once started."""

    an: Analysis
    options: Options
    params: dict
    identity: dict
    writer: RunWriter | None = None
    plan: list[dict] | None = None
    meta: dict | None = None
    created: bool = False
    run: str | None = None  # the id of a complete run reused

    @property
    def inputs(self) -> dict[str, str]:
        """The input files' digests the run checks reads against (as it recorded them, or as they are now)."""
        recorded = self.meta if self.meta is not None else self.writer.meta
        return recorded["inputs"] if "inputs" in recorded else input_digests(self.params)


def score_together(model: Model | str | os.PathLike, jobs: list[tuple[str, dict, dict]],
                   store: Store | str | os.PathLike | None = None, progress: bool | Progress = False) -> list[str]:
    """Score every job into `store` (None: the default store) as `score(model, analysis, store=store, resume=True,
    **options, **params)` would, one run per job, but with one forward pass for the samples whose inputs coincide
    across jobs. jobs: (analysis, options {layers, heads, samples, max_tokens, backend, seed: value}, parameters);
    each analysis must have `sample_pass`. A complete run with the same settings is reused, an incomplete one resumed
    (each job's combination claimed as a sweep claims it). Returns the run ids, in the jobs' order. An error stops
    every run not finished (kept incomplete, resumable; a run created here with no sample done is removed)."""
    model, runs, bars = open_work(model, store, progress)
    for name, _, _ in jobs:
        if not hasattr(get_analysis(name), "sample_pass"):
            raise ValueError(f"analysis {name!r} has no sample_pass: score it on its own")
    keys = sorted(_claim_keys(jobs, model_identity(model)), key=repr)  # one order: two processes never deadlock
    if any(a == b for a, b in zip(keys, keys[1:])):
        raise ValueError("the same analysis with the same settings is given twice")
    with ExitStack() as claims:
        for key in keys:
            claims.enter_context(runs.claim(key, wait=True))
        started: list[_Job] = []
        try:
            for name, options, params in jobs:
                started.append(_start(model, runs, name, options, params))
            _score_samples(model, [j for j in started if j.run is None], bars)
        except BaseException as e:
            for j in started:
                if j.run is None:
                    stop_run(j.writer, j.created, len(j.plan), e)
                    j.writer.unlock()
            raise
        open_jobs = [j for j in started if j.run is None]
        for at, j in enumerate(open_jobs):
            try:
                j.run = _run(j.an, model, j.options, j.params, j.plan, bars, writer=j.writer, meta=j.meta,
                             created=j.created).id
            except BaseException:
                for rest in open_jobs[at + 1:]:
                    rest.writer.unlock()
                raise
    return [j.run for j in started]


def _claim_keys(jobs: list[tuple[str, dict, dict]], identity: dict) -> list[dict]:
    """Each job's combination as a sweep claims it (`interp.sweep.score_combination`)."""
    return [{"analysis": name, "model": identity, "options": options, "params": get_analysis(name).resolve(params)}
            for name, options, params in jobs]


def _start(model: Model, runs: Store, name: str, options: dict, params: dict) -> _Job:
    """A job with a complete run to reuse, or its run reopened (the newest incomplete matching one) or created."""
    an, given = get_analysis(name), Options(**options)
    job = _Job(an, *_settings(an, model, given.layers, given.heads, given.samples, given.max_tokens, given.backend,
                              given.seed, params))
    done = next(_matching(runs, "complete", an.name, job.identity, job.options, job.params), None)
    if done is not None:
        job.run = done.id
        return job
    writer = _reopen_matching(runs, an.name, job.identity, job.options, job.params)
    if writer is not None:
        _check_same_inputs(writer)
    job.writer, job.plan, job.meta, job.created = start_run(an, model, job.options, job.params, job.identity, runs,
                                                            writer)
    return job


def _score_samples(model: Model, jobs: list[_Job], bars: Progress) -> None:
    """Every job's samples not done yet, one forward pass per group of samples with the same inputs (and backend,
    layers, heads), each written to its run as it finishes. A sample's part is built as `score_one` scores it:
    seeded with seed + its index."""
    groups = _groups(model, jobs)
    with bars.bar(total=sum(len(g) for g in groups), desc="together: samples", leave=False) as bar:
        for group in groups:
            parts = []
            for j, i in group:
                torch.manual_seed(j.options.seed + i)
                with recorded_inputs(j.inputs):
                    parts.append(j.an.sample_pass(model, j.plan[i], j.options, j.params))
            o = group[0][0].options
            for (j, i), scored in zip(group, run_passes(model, parts, backend=o.backend, layers=o.layers,
                                                        heads=o.heads, progress=bars)):
                j.writer.write_sample(i, *sample_tables(scored, i))
                bar.update(1)


def _groups(model: Model, jobs: list[_Job]) -> list[list[tuple[_Job, int]]]:
    """The (job, sample index) pairs not done yet, grouped by what their forward pass is: the same inputs, backend,
    layers and heads; in order of first appearance."""
    groups: list[tuple[dict, tuple, list]] = []
    for j in jobs:
        done = j.writer.done()
        for i, sample in enumerate(j.plan):
            if i in done:
                continue
            with recorded_inputs(j.inputs):
                inputs = j.an.sample_inputs(model, sample, j.options, j.params)
            how = (j.options.backend, j.options.layers, j.options.heads)
            same = next((g for g in groups if g[1] == how and same_inputs(g[0], inputs)), None)
            if same is None:
                groups.append((inputs, how, [(j, i)]))
            else:
                same[2].append((j, i))
    return [members for _, _, members in groups]
