"""The store as the dashboard reads it: run listings, and runs opened by id only (never by a path from the
browser), cached until their files change. Nothing is unpickled: meta.json and Parquet only."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from interp.analyses.inputs import file_digest
from interp.files import read_bytes
from interp.results import ScoreResult, as_store, open_run
from interp.store import KEPT_INPUT_LIMIT, CorruptRunError, RunInfo, RunNotFoundError, Store, with_kept_inputs


class RunCatalog:
    """Read-only access to one store directory for the dashboard."""

    def __init__(self, store: Store | str | os.PathLike | None = None):
        self.store = as_store(store)
        self._cache: dict[str, tuple[tuple, ScoreResult]] = {}
        self._lock = threading.Lock()

    def listing(self) -> list[RunInfo]:
        """Every run, newest first; unreadable ones with status "corrupt" and the reason."""
        return self.store.runs() if self.store.root.is_dir() else []

    def info(self, run_id: str) -> RunInfo:
        """The listed run with this id, or the one whose id starts with it (as the CLI finds runs): ids that are
        paths, that name nothing in the store or that several ids start with, are refused."""
        if not isinstance(run_id, str) or not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunNotFoundError(f"no run {run_id!r} in this store")
        listing = self.listing()
        matches = [i for i in listing if i.id == run_id] or [i for i in listing if i.id.startswith(run_id)]
        if len(matches) > 1:
            raise RunNotFoundError(f"run id {run_id!r} is ambiguous in {self.store.root}: "
                                   f"{', '.join(sorted(i.id for i in matches))}")
        if not matches:
            raise RunNotFoundError(f"no run {run_id!r} in {self.store.root}")
        return matches[0]

    def replay_meta(self, run_id: str, sample: int) -> dict:
        """The run's meta as the attention views replay `sample`: its inputs read from the run's own copies, under the
        run's resolved directory, each copy the sample reads first checked against the digest the run recorded for its
        original where it recorded one (CorruptRunError when they differ); and "replay": {"run": that directory,
        "inputs": {copy: digest}}, which keys the views' cache (`replay_key`)."""
        result = self.result(run_id)
        run = result.path.resolve()
        meta = with_kept_inputs(result.meta, run)
        originals = {str(run / name): recorded for recorded, name in result.meta.get("kept_inputs", {}).items()
                     if isinstance(name, str) and (run / name).parent == run / "inputs"}
        recorded_digests = result.meta.get("inputs") if isinstance(result.meta.get("inputs"), dict) else {}
        digests = {}
        for copy in sorted(set(_strings([meta["plan"][sample], meta["params"]])) & set(originals)):
            original = originals[copy]
            digests[copy] = file_digest(Path(original).name, read_bytes(copy, KEPT_INPUT_LIMIT))
            if recorded_digests.get(original, digests[copy]) != digests[copy]:
                raise CorruptRunError(f"run {run_id}: its copy {Path(copy).name} of {original} differs from the sha256 "
                                      "the run recorded: changed since, it is not replayed")
        return {**meta, "replay": {"run": str(run), "inputs": digests}}

    def result(self, run_id: str) -> ScoreResult:
        """The run's tables (an incomplete run: the samples it has finished), re-read only when its files change.
        CorruptRunError when the run cannot be read."""
        info = self.info(run_id)
        if info.status == "corrupt":
            raise CorruptRunError(f"run {info.id} is corrupt: {info.error}")
        stamp = _stamp(info)
        with self._lock:
            hit = self._cache.get(info.id)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        try:
            result = open_run(info.path)
        except (OSError, ValueError, KeyError) as e:
            raise CorruptRunError(f"run {info.id} cannot be read: {e}") from e
        with self._lock:
            self._cache[info.id] = (stamp, result)
        return result


def _strings(value) -> list[str]:
    """Every string in nested lists and dicts, and each part of an "a,b" string (how runs record input paths)."""
    if isinstance(value, dict):
        return _strings(list(value.values()))
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value, *value.split(",")] if isinstance(value, str) else []


def _stamp(info: RunInfo) -> tuple:
    """What changes when a run's files do: meta.json's and parts/'s modification times."""
    def mtime(p):
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return None
    return mtime(info.path / "meta.json"), mtime(info.path / "parts")
