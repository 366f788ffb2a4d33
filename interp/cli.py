"""The `interp` command line: score the heads of a model, browse and export the runs in the store.

Exit codes: 0 success; 2 a usage error (unknown flag or analysis, malformed value); 1 a failure while doing
the work (model not loadable, analysis not applicable, store not writable, run missing or corrupt,
interrupted); 141 (128 + SIGPIPE, as for other Unix tools) quietly, when standard output is a pipe closed early
(`interp show RUN | head`). Messages go to stderr; with --json, stdout holds only the JSON document.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import select
import signal
import sys
import threading
from contextlib import nullcontext, redirect_stdout
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import interp

from .catalog import ALIASES, DEFAULT_MODEL, FAMILIES
from .compare import head_label
from .params import base_type, cli_flag, help_text, parse
from .store import EXPORT_FORMATS, RunNotFoundError, Store, is_atlas, stopped_runs

if TYPE_CHECKING:
    from .progress import Progress
    from .results import ScoreResult

# What every command needs is imported above; what only some need (torch, transformers, pandas) is imported by
# the commands themselves, so that `runs`, `show`, `export` and `models` start fast.

DEFAULT_TOP = 10


class UsageError(ValueError):
    """A malformed command line: exit code 2."""


# C0 controls, DEL and C1 controls (escape sequences: a clipboard write, a screen clear, a hyperlink), as \xNN
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_CONTROL_IN_LINES = {c: shown for c, shown in _CONTROL.items() if chr(c) not in "\n\t"}


def printable(text, lines: bool = False) -> str:
    """`text` (a run's words: a model name, a run id, an error) safe to print on a terminal: its control characters
    shown as \\xNN rather than obeyed. lines: newlines and tabs are kept (a message, not a table's field)."""
    return str(text).translate(_CONTROL_IN_LINES if lines else _CONTROL)


MAX_INDEX = 99_999  # no model has more layers or heads: ranges are checked before they are expanded


def _indices(text: str, what: str) -> tuple[int, ...]:
    """'0-3,7' -> (0, 1, 2, 3, 7); ranges checked (0..MAX_INDEX) before they are expanded."""
    shown = text if len(text) <= 40 else text[:37] + "..."
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            lo, hi = int(lo), int(hi) if sep else int(lo)
            if hi < lo:
                raise ValueError
            if not 0 <= lo <= hi <= MAX_INDEX:
                raise UsageError(f"--{what} {shown!r}: indices lie in 0..{MAX_INDEX}")
            out.update(range(lo, hi + 1))
    except UsageError:
        raise
    except ValueError:
        raise UsageError(f"--{what} {shown!r}: give indices and ranges such as 0-3,7") from None
    return tuple(sorted(out))


def _models(args) -> int:
    if args.json:
        print(json.dumps({
            "aliases": [{"name": a.name, "description": a.description, "source": a.source} for a in ALIASES.values()],
            "default": DEFAULT_MODEL,
            "families": [{"name": f.name, "kind": f.kind, "model_types": list(f.model_types),
                          "towers": [t.name for t in f.towers]} for f in FAMILIES],
            "discovered": DISCOVERED,
        }, indent=2))
        return 0
    print("Built-in aliases (offline):")
    for a in ALIASES.values():
        star = " (default)" if a.name == DEFAULT_MODEL else ""
        print(f"  {a.name:<14} {a.description}{star}\n  {'':<14} from: {a.source}")
    print(f"\nAny other model: {DISCOVERED}")
    print("\nFamilies with a hand table (image-token grids, the special tokens before a ViT's patches; a table wins):")
    for f in FAMILIES:
        towers = "+".join(t.name for t in f.towers) or "discovered"
        print(f"  {f.name:<10} {f.kind:<8} {towers:<12} {', '.join(f.model_types)}" + (f"  — {f.notes}" if f.notes else ""))
    return 0


DISCOVERED = ("any hub id or local folder whose attention modules call transformers' attention interface "
              "(ALL_ATTENTION_FUNCTIONS) is adapted from the model itself (towers, attention layers, causality, kind). "
              "Refused with the reason: attention outside that interface, encoder-decoder models, logit biases "
              "(ALiBi, relative positions), masks other than causal / sliding window / padding, chunked attention.")


def _generate(args) -> int:
    from interp.analyses.images import load_image
    from interp.analyses.vhd import vhr_generate
    from interp.models import load_model

    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be at least 1")
    if args.vhr is not None and args.image is None:
        raise UsageError("--vhr reinforces vision-aware heads: give --image")
    if args.vhr is not None and args.vhr <= 0:
        raise UsageError(f"--vhr {args.vhr}: give a factor > 0 (the paper uses 2)")
    _progress(args)  # loading bars only on a terminal without --json
    model = load_model(args.model, device=args.device, trust_remote_code=args.trust_remote_code)
    if model.family.kind not in ("llm", "lvlm") or not hasattr(model.hf, "generate"):
        raise ValueError(f"{model.name} is {'an' if model.family.kind == 'encoder' else 'a'} {model.family.kind}: it "
                         "does not generate text; `interp generate` takes language or vision-language models")
    if args.image is not None and model.family.kind != "lvlm":
        raise ValueError(f"{model.name} is a language model, not a vision-language model: drop --image")
    if args.image is None and model.family.kind == "lvlm":
        raise ValueError(f"{model.name} is a vision-language model: give --image FILE")
    heads = None
    if args.vhr is not None:
        tokens, chosen = vhr_generate(model, args.prompt, load_image(args.image), alpha=args.vhr, layers=args.vhr_layers,
                                      no_image=args.no_image, max_new_tokens=args.max_new_tokens)
        heads = [f"{layer}-{h}" for layer, hs in chosen.items() for h in hs]
    else:  # the same greedy decoding as VHR's, so that the two answers compare
        from interp.analyses.inputs import greedy, lvlm_prompt

        inputs = (model.prepare(lvlm_prompt(model, args.prompt), images=[load_image(args.image)]) if args.image
                  else model.prepare(args.prompt))
        tokens = greedy(model, inputs, args.max_new_tokens)
    text = model.tokenizer.decode(tokens, skip_special_tokens=True)
    if args.json:
        print(json.dumps({"text": text, "tokens": [int(t) for t in tokens], "vhr_alpha": args.vhr,
                          "reinforced_heads": heads}))
    else:
        print(text)
        if heads is not None:
            print(f"(VHR α = {args.vhr}: {len(heads)} heads reinforced: {', '.join(heads)})", file=sys.stderr)
    return 0


def run_json(result: ScoreResult, top: int) -> dict:
    """The stable JSON description of a run (what `score --json` and `show --json` print)."""
    m = result.meta
    return {
        "id": result.id, "path": str(result.path) if result.path else None, "status": result.status,
        "analysis": result.analysis, "model": m["model"], "options": m["options"], "params": m["params"],
        "samples": len(m["plan"]), "samples_done": result.samples_done, "started": m.get("started"), "finished": m.get("finished"),
        "scores": m["scores"],
        "top": {s: _ranked(result, s, top) for s in result.scores if s in result.heads.columns},
        "report": _report(result),
        "tables": {name: json.loads(t.to_json(orient="records")) for name, t in result.tables.items()},
    }


def _report(result: ScoreResult) -> list[str]:
    """A complete run's report: the lines it recorded, or (a run written before they were) its analysis's."""
    if result.status != "complete":
        return []
    if "report" in result.meta:
        return result.meta["report"]
    from interp.analyses import get_analysis

    return get_analysis(result.analysis).report(result)


def _ranked(result: ScoreResult, score: str, top: int) -> list[dict]:
    return [{"rank": i + 1, "layer": int(r["layer"]), "head": int(r["head"]), "kv_head": int(r["kv_head"]),
             "value": float(r[score])} for i, r in result.top(score, top).iterrows()]


def print_tables(result: ScoreResult, top: int) -> None:
    """The ranked table of the top heads for each score."""
    m = result.meta
    model = m["model"]
    size = {key: printable(model.get(key, "?")) for key in ("family", "n_layers", "n_heads", "n_kv_heads")}
    done, planned, unit = result.counted()
    print(f"{printable(result.analysis)} · {printable(model['name'])} ({size['family']}, {size['n_layers']} layers × "
          f"{size['n_heads']} heads, {size['n_kv_heads']} KV heads) · {done}/{planned} {unit} · "
          f"{printable(result.status)}")
    for score, meaning in m["scores"].items():
        shown, meaning = printable(score), printable(meaning)
        if score not in result.heads.columns:  # an incomplete run: no finished sample gives this score yet
            print(f"\n{shown}: {meaning}\n  no finished sample gives it yet ({printable(result.status)} run)")
            continue
        uninformative = _uninformative(result.heads[score])
        if uninformative:
            print(f"\n{shown}: {meaning}\n  {uninformative}: no ranking to show")
            continue
        ranked = _ranked(result, score, top)
        rows = ranked
        while rows and rows[-1]["value"] == 0:  # the zeros the ranking ends with rank nothing
            rows = rows[:-1]
        width = max(10, len(shown))
        print(f"\ntop {len(rows)} heads by {shown}: {meaning}")
        print(f"  {'rank':>4}  {'layer':>5}  {'head':>4}  {'kv_head':>7}  {shown:>{width}}")
        for r in rows:
            print(f"  {r['rank']:>4}  {r['layer']:>5}  {r['head']:>4}  {r['kv_head']:>7}  {r['value']:>{width}.4f}")
        if len(rows) < len(ranked):
            print(f"  (the other {int((result.heads[score] == 0).sum())} heads score 0)")
    for line in _report(result):
        print(printable(line))
    if result.tables:
        print(f"\ntables: {', '.join(printable(name) for name in result.table_names)} "
              f"(`interp export {printable(result.id)} --table NAME`)")


def _uninformative(values) -> str | None:
    """Why a score column ranks no head (no value, or one value for every head), else None."""
    finite = values[values.notna()]
    if finite.empty:
        return f"no head has a value ({len(values)} heads)"
    if len(finite) > 1 and (finite == finite.iloc[0]).all():
        return f"every head scores {float(finite.iloc[0]):.4g} ({len(finite)} heads)"
    return None


def _score(args) -> int:
    from interp.analyses import ANALYSES, get_analysis
    from interp.scoring import MAX_SAMPLES, score

    names = [n.strip() for n in args.analysis.split(",") if n.strip()]
    try:
        analyses = [get_analysis(n) for n in names]
    except ValueError as e:
        raise UsageError(str(e)) from None
    if not analyses:
        raise UsageError(f"--analysis: name at least one of {', '.join(ANALYSES)}")
    given = {name: getattr(args, name) for a in ANALYSES.values() for name in a.params
             if getattr(args, name) is not None}
    for key in given:
        if not any(key in a.params for a in analyses):
            raise UsageError(f"--{key.replace('_', '-')} applies to none of {', '.join(names)}")
    if args.samples is not None and args.samples > MAX_SAMPLES:
        raise UsageError(f"--samples {args.samples}: give at most {MAX_SAMPLES:,}")
    layers = _indices(args.layers, "layers") if args.layers is not None else None  # "" is refused, not "all"
    heads = _indices(args.heads, "heads") if args.heads is not None else None
    resume = args.resume if args.resume != "auto" else True
    if isinstance(resume, str) and len(analyses) > 1:
        raise UsageError("--resume RUN finishes one run: give one analysis (or --resume alone)")

    cluster = _cluster_of(args)
    bars = _progress(args)
    store = Store(args.out)
    store.check_writable()  # before loading anything
    with bars.status(f"loading {args.model}"):
        from interp.models import load_model

        model = (cluster.driver_model(args.model) if cluster is not None else  # the workers load it where they run
                 load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code))
    for a in analyses:  # every analysis applies before any starts
        a.check(model)
    results = []
    with _workers(cluster, model) as workers:  # None without --cluster; else started on the first sample, for all
        for a in analyses:
            result = score(model, a.name, layers=layers, heads=heads, samples=args.samples, max_tokens=args.max_tokens,
                           backend=args.backend, seed=args.seed, store=store, resume=resume, progress=bars,
                           cluster=workers, **{k: v for k, v in given.items() if k in a.params})
            results.append(result)
            if not args.json:
                print_tables(result, args.top)
                print(f"\nrun {printable(result.id)}\n    {printable(result.path)}\n")
    if args.json:
        print(json.dumps({"runs": [run_json(r, args.top) for r in results]}, indent=2))
    return 0


def _cluster_arguments(p: argparse.ArgumentParser) -> None:
    """`--cluster` and the workers' resources (score, sweep, atlas)."""
    p.add_argument("--cluster", metavar="ADDRESS",
                   help="score on Ray workers: ray (a local cluster started for the run), auto (the cluster `ray start` "
                        "began on this machine), HOST:PORT or ray://HOST:PORT (an existing cluster's head)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="--cluster: workers, each holding the model (default: one per --gpus-per-worker GPUs, else per "
                        "--cpus-per-worker CPUs, never more than the cluster's cores)")
    p.add_argument("--cpus-per-worker", type=float, metavar="N", help="--cluster: CPUs (torch threads) per worker (1)")
    p.add_argument("--gpus-per-worker", type=float, metavar="N",
                   help="--cluster: GPUs per worker (default 0; with GPUs a worker loads the model on cuda)")
    p.add_argument("--device-map", metavar="MAP",
                   help="--cluster: accelerate's device map inside each worker, e.g. auto (a model larger than one GPU)")


def _cluster_of(args):
    """The `Cluster` the flags ask for (the workers load args.model), or None without --cluster."""
    extra = [f for f in ("workers", "cpus_per_worker", "gpus_per_worker", "device_map") if getattr(args, f) is not None]
    if args.cluster is None:
        if extra:
            raise UsageError(f"--{extra[0].replace('_', '-')} sets up cluster workers: give --cluster too")
        return None
    from interp.cluster import Cluster

    try:
        return Cluster(args.cluster, workers=args.workers,
                       cpus_per_worker=1 if args.cpus_per_worker is None else args.cpus_per_worker,
                       gpus_per_worker=0 if args.gpus_per_worker is None else args.gpus_per_worker, model=getattr(args, "model", None), dtype=args.dtype,
                       device=args.device, device_map=args.device_map, trust_remote_code=args.trust_remote_code)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _workers(cluster, model):
    """A context holding the Workers of `cluster` (stopped on leaving it), or None."""
    if cluster is None:
        return nullcontext(None)
    from interp.cluster import Workers

    return Workers(cluster, model)


def _sweep(args) -> int:
    from interp.sweep import read_sweep, run_sweep, summary_lines

    sweep = read_sweep(args.file)
    cluster = _cluster_of(args)
    loading = dict(dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    rows = run_sweep(sweep, Store(args.out), cluster=cluster, loading=loading, progress=_progress(args))
    if args.json:
        print(json.dumps({"store": str(Store(args.out).root), "runs": rows}, indent=2))
    else:
        print("\n".join(printable(line) for line in summary_lines(rows)))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def atlas_json(atlas, store: Store, comparison=None) -> dict:
    """The JSON of `interp atlas --json`: the atlas's id, roles (role -> heads in L-H notation), every role overlap
    row, the runs (analysis -> run id), the analyses skipped with why, and with --compare the comparison's rows."""
    roles = {name: [head_label(r.layer, r.head) for r in atlas.roles[atlas.roles[name]].itertuples()]
             for name in atlas.role_names}
    doc = {"id": atlas.id, "model": atlas.model, "store": str(store.root), "preset": atlas.preset, "roles": roles,
           "overlaps": _records(atlas.overlaps()), "runs": dict(atlas.runs), "skipped": dict(atlas.skipped)}
    if comparison is not None:
        doc["compare"] = _records(comparison)
    return doc


def _records(table) -> list[dict]:
    """A table's rows as JSON-able dicts (NaN as null)."""
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            for row in table.to_dict("records")]


def _atlas_html_target(path: str, store: Store):
    """`interp atlas --html FILE`'s FILE, after refusing a folder, a symlink or anything not a regular file, and a
    path inside the store (checked before the model loads)."""
    target = Path(path).expanduser()
    if target.is_symlink() or (target.exists() and not target.is_file()):
        kind = "a symlink" if target.is_symlink() else "a folder" if target.is_dir() else "not a regular file"
        raise ValueError(f"--html {path} is {kind}: give a file to write the atlas page to")
    root = store.root.resolve()
    if target.resolve().is_relative_to(root):
        raise ValueError(f"--html {path} lies inside the store {root}: write it elsewhere, a store's files are "
                         "written by interp only")
    return target


def _atlas(args) -> int:
    from interp.atlases import compare_atlases
    from interp.models import load_model

    progress = _progress(args)
    store = Store(args.out)
    store.check_writable()  # before the model loads
    html = _atlas_html_target(args.html, store) if args.html else None
    other = _stored_atlas(args.compare, store) if args.compare else None  # a stored atlas: found before any work
    cluster = _cluster_of(args)

    def atlas_of(name: str):
        """`name`'s atlas with the preset, in the store: on the cluster's workers (which load `name`) or here."""
        if cluster is not None:
            return interp.atlas(name, args.preset, store, progress=progress, cluster=replace(cluster, model=name))
        model = load_model(name, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
        return interp.atlas(model, args.preset, store, progress=progress)

    atlas = atlas_of(args.model)
    if args.compare and other is None:  # a model: its atlas with the same preset, in the same store
        other = atlas_of(args.compare)
    comparison = compare_atlases(atlas, other) if other is not None else None
    if html is not None:
        atlas.to_html(html)
        print(f"wrote the atlas page of {printable(atlas.model)} to {printable(html)}", file=sys.stderr)
    if args.json:
        print(json.dumps(atlas_json(atlas, store, comparison), indent=2))
        return 0
    print(printable(f"Atlas {atlas.id} of {atlas.model} ({args.preset} preset, store {store.root})"))
    for line in atlas.summary_lines():
        print(printable(line) if line.startswith(" ") else "\n" + printable(line))
    if comparison is not None:
        print(printable(f"\nCompared with atlas {other.id} of {other.model} "
                        f"(heads matched by {comparison['match'].iloc[0] if len(comparison) else '-'}):"))
        for line in comparison_lines(comparison):
            print(printable(line))
    return 0


def comparison_lines(comparison) -> list[str]:
    """`compare_atlases`' table in words: per role, the heads both atlases give it and those only one does (matched
    by layer and head), or the role's mean relative depth in each and their profiles' correlation."""
    lines = []
    for r in comparison.itertuples():
        if r.match.startswith("only"):
            lines.append(f"  {r.role}: {r.match}")
        elif r.match == "layer-head":
            lines.append(f"  {r.role}: A {r.n_a}, B {r.n_b}, both {r.both} (Jaccard {_fmt(r.jaccard)}, chance "
                         f"{_fmt(r.expected)}, p = {_fmt(r.p_exact, '.4f')}); lost in B: {r.only_a or '-'}; "
                         f"gained in B: {r.only_b or '-'}")
        else:
            lines.append(f"  {r.role}: mean relative depth A {_fmt(r.depth_a)}, B {_fmt(r.depth_b)}; per-layer "
                         f"profile correlation {_fmt(r.profile_corr)}")
    return lines or ["  no roles"]


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _stored_atlas(ref: str, store: Store):
    """`--compare B`'s atlas when B names an atlas entry of `store` (id, prefix or directory); None when B is not
    an entry there (then B is a model)."""
    from interp.atlases import open_atlas

    try:
        store.find(ref)
    except RunNotFoundError:
        return None
    return open_atlas(ref, store)


def _show_atlas(result, args) -> int:
    """`interp show ATLAS`: the atlas's roles, overlaps and runs as recorded when it was saved (with --json: its id,
    model, roles -> heads, runs and skipped analyses), read from the entry alone."""
    table, m = result.heads, result.meta
    roles = {c.removeprefix("role:"): [head_label(r["layer"], r["head"]) for r in table[table[c]].to_dict("records")]
             for c in table.columns if c.startswith("role:")}
    if args.json:
        print(json.dumps({"id": result.id, "kind": "atlas", "model": m["model"]["name"], "preset": m["options"].get(
            "preset"), "roles": roles, "runs": m["runs"], "skipped": m.get("skipped", {})}, indent=2))
        return 0
    print(printable(f"Atlas {result.id} of {m['model']['name']}"))
    for line in m.get("report", []):
        print(printable(line) if line.startswith(" ") else "\n" + printable(line))
    print(f"\natlas {printable(result.id)}\n    {printable(result.path)}")
    return 0


def _runs(args) -> int:
    runs = Store(args.store).runs()
    if args.json:
        print(json.dumps({"store": str(Store(args.store).root), "runs": [r.to_json() for r in runs]}, indent=2))
        return 0
    if not runs:
        print(f"no runs in {printable(Store(args.store).root)}")
        return 0
    print(f"{'id':<44} {'status':<10} {'analysis':<10} {'model':<20} {'samples':>9}  started")
    for r in runs:
        if r.status == "corrupt":
            print(f"{printable(r.id):<44} {'corrupt':<10} {printable(r.error)}")
            continue
        done, total = r.progress
        print(f"{printable(r.id):<44} {r.status:<10} {printable(r.meta['analysis']):<10} "
              f"{printable(r.meta['model']['name']):<20} {f'{done}/{total}':>9}  "
              f"{printable(r.started[:19].replace('T', ' '))}")
    return 0


def _show(args) -> int:
    from .results import open_run

    result = open_run(args.run, args.store)
    if is_atlas(result.meta):
        return _show_atlas(result, args)
    if args.json:
        print(json.dumps(run_json(result, args.top), indent=2))
        return 0
    print_tables(result, args.top)
    run = printable(result.id)
    if result.status != "complete":
        print(f"\nrun {run} is incomplete: finish it with `interp score {printable(result.meta['model']['name'])} "
              f"--analysis {printable(result.analysis)} --resume {run} --out {printable(Store(args.store).root)}`")
    print(f"\nrun {run}\n    {printable(result.path)}")
    return 0


def _export(args) -> int:
    from .results import open_run

    result = open_run(args.run, args.store)
    output = args.output
    if output is None and args.format == "parquet":
        output = f"{result.id}-{args.table}.parquet"
    if output in (None, "-") and args.format != "parquet" and sys.stdout.isatty():  # text a person reads: made safe
        text = io.StringIO()
        with redirect_stdout(text):
            result.export(None, args.format, args.table)
        sys.stdout.write(printable(text.getvalue(), lines=True))
    else:
        result.export(output, args.format, args.table)
    if output not in (None, "-"):
        print(f"wrote {printable(args.table)} table of run {printable(result.id)} to {printable(output)}",
              file=sys.stderr)
    return 0


def _progress(args) -> Progress:
    from .progress import Progress

    bars = Progress(None if not args.json else False)
    if not bars.enabled:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        _silence_tqdm()
    return bars


def _silence_tqdm() -> None:
    """Libraries' own tqdm bars too (transformers' GGUF de-quantisation draws one): off for this process."""
    from functools import partialmethod

    from tqdm import std

    if not getattr(std.tqdm, "_interp_silenced", False):
        std.tqdm.__init__ = partialmethod(std.tqdm.__init__, disable=True)
        std.tqdm._interp_silenced = True


def _app(args) -> int:
    from interp.app.attention import AttentionSource
    from interp.app.dashboard import LOCAL_HOSTS, make_app

    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give 1..65535")
    store = Store(args.store)
    if not store.root.is_dir():
        raise ValueError(f"no store at {store.root}: score a model first (`interp score ... --out {store.root}`)")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"interp: warning: listening on {args.host}: anyone who can reach it can read this store's runs",
              file=sys.stderr)
    hosts = (*LOCAL_HOSTS, args.host, *(args.allow_host or ()))
    app = make_app(store, AttentionSource(device=args.device, allow=args.models or ()), hosts=hosts)
    print(f"interp: dashboard of {store.root} at http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    app.run(host=args.host, port=args.port, debug=False)
    return 0


def _score_arguments(p: argparse.ArgumentParser) -> None:
    from interp.analyses import ANALYSES
    from interp.hooks import BACKENDS

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in alias, local folder or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--analysis", "-a", default="summary",
                   help=f"analysis name(s), comma-separated: {', '.join(ANALYSES)} (default summary)")
    p.add_argument("--layers", help="layers to score, e.g. 0-5,10 (default all)")
    p.add_argument("--heads", help="query heads to score in each layer, e.g. 0,3 (default all)")
    p.add_argument("--samples", type=int, help="number of samples (default: the analysis's)")
    p.add_argument("--max-tokens", type=int, help="longest input in tokens (default: the analysis's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped with the checkpoint (off by default; never asked on stdin)")
    p.add_argument("--backend", choices=BACKENDS, default="hf", help="capture backend (default hf)")
    p.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    p.add_argument("--out", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="RUN",
                   help="finish the newest incomplete run with the same settings, or the run RUN")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"heads per ranked table (default {DEFAULT_TOP})")
    p.add_argument("--json", action="store_true", help="print the runs as JSON on stdout (no progress bars)")
    _parameter_flags(p, ANALYSES)
    _cluster_arguments(p)
    p.set_defaults(func=_score)


def _parameter_flags(p: argparse.ArgumentParser, analyses: dict) -> None:
    """The analyses' parameters as flags, built from their parameter dataclasses: one group per analysis, and one
    for the names several analyses declare. Such a name is one flag with one meaning (its spec is the same in
    each; only the defaults differ: TypeError otherwise) and it feeds every selected analysis that takes it."""
    declared: dict[str, list] = {}
    for a in analyses.values():
        for name, (spec, kind, default) in a.Params.specs().items():
            declared.setdefault(name, []).append((a.name, spec, kind, default))
    groups = {a: p.add_argument_group(f"{a} parameters") for a in analyses}
    shared = p.add_argument_group("parameters of several analyses")
    for name, entries in declared.items():
        owners = [owner for owner, *_ in entries]
        _, spec, kind, _ = entries[0]
        differ = [owner for owner, other, other_kind, _ in entries if (other, other_kind) != (spec, kind)]
        if differ:  # a definition error, caught by every test that builds the parser
            raise TypeError(f"parameter {name!r} means different things in {owners[0]} and {', '.join(differ)}: "
                            "declare it with one type and Spec (a shared one in interp/params.py), or rename it")
        text = help_text(spec, {owner: default for owner, _, _, default in entries})
        group = groups[owners[0]] if len(owners) == 1 else shared
        if len(owners) > 1:
            text = f"{', '.join(owners)}: {text}"
        if base_type(kind)[0] is bool:
            group.add_argument(cli_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
        else:
            group.add_argument(cli_flag(name), dest=name, type=_parameter_type(name, kind), metavar=spec.metavar,
                               help=text)


def _parameter_type(name: str, kind):
    """An argparse type parsing a flag's text as the parameter's annotation asks (a malformed value: exit 2)."""
    def convert(text: str):
        try:
            return parse(kind, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    convert.__name__ = name
    return convert


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="sweep file (.toml or .yaml): models, analyses, [options], [params.ANALYSIS] grids")
    p.add_argument("--out", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: checkpoint's)")
    p.add_argument("--device", help="the models' device (with --cluster, the workers'; default cpu, cuda with "
                                    "--gpus-per-worker)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped with the checkpoints (off by default; never asked on stdin)")
    p.add_argument("--json", action="store_true", help="print one JSON row per combination on stdout")
    _cluster_arguments(p)
    p.set_defaults(func=_sweep)


def build_parser(light: bool = False) -> argparse.ArgumentParser:
    """The CLI's parser. light: leave out the `score` options that need the analyses and backends imported (torch,
    transformers: seconds), for every command line but `score`'s (`interp --help` included); `score` is then listed
    but cannot be parsed."""
    parser = argparse.ArgumentParser(prog="interp", description="Trace and score the attention heads of a model.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every head of a model with one or more analyses, into the store")
    if not light:
        _score_arguments(p)

    p = sub.add_parser("sweep", help="one run per model × analysis × parameter combination of a sweep file, "
                                     "skipping those complete in the store; optionally on a Ray cluster")
    _sweep_arguments(p)

    p = sub.add_parser("atlas", help="score a model with every analysis that applies to it (reusing complete runs) "
                                     "and list its heads by role, with the roles that overlap beyond chance")
    p.add_argument("model", help="built-in alias, local folder or hub id")
    p.add_argument("--preset", choices=("quick", "full"), default="quick",
                   help="quick: few samples and short inputs (a small model in minutes on a CPU); full: each "
                        "analysis's defaults (default quick)")
    p.add_argument("--out", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps... (default cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="weights dtype (default: checkpoint's)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped with the checkpoint (off by default; never asked on stdin)")
    p.add_argument("--json", action="store_true", help="print roles, overlaps and runs as one JSON object")
    p.add_argument("--html", metavar="FILE", help="also write one self-contained HTML page (role grid, role "
                                                  "overlaps, every head's card) that opens offline")
    p.add_argument("--compare", metavar="B", help="compare with B: an atlas in the store (id or prefix) or a model "
                                                  "(its atlas is built with the same preset); roles matched by layer "
                                                  "and head where the heads agree, else by relative depth")
    _cluster_arguments(p)
    p.set_defaults(func=_atlas)

    p = sub.add_parser("runs", help="list the runs in the store, newest first, with their status")
    p.add_argument("--store", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_runs)

    p = sub.add_parser("show", help="the ranked tables of a run (or an atlas's roles, overlaps and runs)")
    p.add_argument("run", help="run id (or a unique prefix of it), or a run directory")
    p.add_argument("--store", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"heads per ranked table (default {DEFAULT_TOP})")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_show)

    p = sub.add_parser("export", help="write one table of a run (heads, samples, or its analysis's: masking, "
                                        "faithfulness, …) as csv, parquet or json")
    p.add_argument("run", help="run id (or a unique prefix of it), or a run directory")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="csv")
    p.add_argument("--table", default="heads", metavar="NAME",
                   help="heads (default), samples, or any table of the run's analysis (masking, faithfulness, "
                        "overlap, …: `interp show RUN` lists them)")
    p.add_argument("--output", "-o", metavar="FILE",
                   help="output file, replaced atomically; '-' for stdout (default: stdout for csv / json, "
                        "<run>-<table>.parquet for parquet). Refused: devices, FIFOs, symlinks, folders, the store")
    p.add_argument("--store", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.set_defaults(func=_export)

    p = sub.add_parser("app", help="the dashboard: browse the runs, heads and attention of a store in a browser")
    p.add_argument("--store", metavar="DIR", help="store directory (default $INTERP_STORE or the user data dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8050, help="port (default 8050)")
    p.add_argument("--allow-host", action="append", metavar="NAME",
                   help="another name the browser may use for this server (its Host header; repeatable; '*' for any). "
                        "Default: --host, localhost, 127.0.0.1 and ::1 only (no DNS rebinding)")
    p.add_argument("--device", help="device for the models that attention views load (default cpu)")
    p.add_argument("--models", action="append", metavar="DIR",
                   help="models the attention views may load besides the built-in aliases: a folder of models (every "
                        "model folder below it), or a model's folder or hub id as runs name it (repeatable). A path a "
                        "run records is never loaded for being recorded")
    p.set_defaults(func=_app)

    p = sub.add_parser("generate", help="greedy generation (up to the first newline), for vision-language models "
                                        "optionally with VHR")
    p.add_argument("model", help="built-in alias, local folder or hub id")
    p.add_argument("--prompt", required=True, help="the prompt (the question about the image)")
    p.add_argument("--image", help="an image file (vision-language models)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default 32)")
    p.add_argument("--vhr", type=float, metavar="ALPHA", help="reinforce vision-aware heads by ALPHA (the paper: 2)")
    p.add_argument("--vhr-layers", type=_parameter_type("vhr_layers", list[int]), metavar="L,L", help="layers VHR may reinforce (default 1 and the last 14)")
    p.add_argument("--no-image", choices=("drop", "blank", "mean"), default="drop",
                   help="VHR's image-free input (default drop)")
    p.add_argument("--device", help="cpu, cuda, … (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run modeling code shipped with the checkpoint (off by default; never asked on stdin)")
    p.add_argument("--json", action="store_true", help="print text, token ids and reinforced heads as JSON")
    p.set_defaults(func=_generate)

    p = sub.add_parser("models", help="list the built-in aliases and the supported model families")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_models)
    return parser


SIGPIPE_EXIT = 128 + signal.SIGPIPE  # 141: what a shell reports for a Unix tool stopped by a closed pipe


def _reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (`interp show RUN | head`: head is done)."""
    poll = select.poll()
    poll.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poll.poll(0))


def _terminated(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(light=not argv or argv[0] != "score")
    args = parser.parse_args(argv)
    for name in ("samples", "max_tokens", "top"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if main_thread else None  # `kill` stops a run like Ctrl-C
    stopped_before = set(stopped_runs())  # what an interrupt of this command leaves is what it adds
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, so that a reader gone early is met below, not at exit
        return code
    except BrokenPipeError as e:
        if not _reader_gone():  # another pipe broke (a socket of the work): a failure like any other
            print(f"interp: error: {printable(e, lines=True)}", file=sys.stderr)
            return 1
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's own flush at exit finds no pipe to complain of
        os.close(devnull)
        return SIGPIPE_EXIT
    except UsageError as e:
        parser.print_usage(sys.stderr)
        print(f"interp: error: {printable(e, lines=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stopped = [run for run in stopped_runs() if run not in stopped_before]
        if not stopped:
            print("interp: interrupted; no run was left incomplete", file=sys.stderr)
        else:
            again = "the same sweep again" if getattr(args, "func", None) is _sweep else "the same command with --resume"
            print(f"interp: interrupted; run {', '.join(stopped)} stays incomplete (its finished samples are kept): "
                  f"run {again} to finish it", file=sys.stderr)
        return 1
    except (ValueError, OSError, RuntimeError) as e:
        print(f"interp: error: {printable(e, lines=True)}", file=sys.stderr)
        return 1
    except Exception as e:  # anything else (a device torch lacks, a library's own error): a message, not a traceback
        print(f"interp: error: {type(e).__name__}: {printable(e, lines=True)}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
