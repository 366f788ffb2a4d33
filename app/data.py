"""The store as the dashboard reads it: run listings, and runs opened by id only (never by a path from the
browser), cached until their files change. Nothing is unpickled: meta.json and Parquet only."""

from __future__ import annotations

import os
import threading

from interp.results import ScoreResult, as_store, open_run
from interp.store import CorruptRunError, RunInfo, RunNotFoundError, Store, with_kept_inputs


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
        """The listed run with exactly this id: ids that are paths, or name nothing in the store, are refused."""
        if not isinstance(run_id, str) or not run_id or "/" in run_id or "\\" in run_id or run_id.startswith("."):
            raise RunNotFoundError(f"no run {run_id!r} in this store")
        for info in self.listing():
            if info.id == run_id:
                return info
        raise RunNotFoundError(f"no run {run_id!r} in {self.store.root}")

    def replay_meta(self, run_id: str) -> dict:
        """The run's meta with its inputs read from the run's own copies (what the attention views replay)."""
        result = self.result(run_id)
        return with_kept_inputs(result.meta, result.path)

    def result(self, run_id: str) -> ScoreResult:
        """The run's tables (an incomplete run: the samples it has finished), re-read only when its files change.
        CorruptRunError when the run cannot be read."""
        info = self.info(run_id)
        if info.status == "corrupt":
            raise CorruptRunError(f"run {run_id} is corrupt: {info.error}")
        stamp = _stamp(info)
        with self._lock:
            hit = self._cache.get(run_id)
            if hit is not None and hit[0] == stamp:
                return hit[1]
        try:
            result = open_run(info.path)
        except (OSError, ValueError, KeyError) as e:
            raise CorruptRunError(f"run {run_id} cannot be read: {e}") from e
        with self._lock:
            self._cache[run_id] = (stamp, result)
        return result


def _stamp(info: RunInfo) -> tuple:
    """What changes when a run's files do: meta.json's and parts/'s modification times."""
    def mtime(p):
        try:
            return p.stat().st_mtime_ns
        except OSError:
            return None
    return mtime(info.path / "meta.json"), mtime(info.path / "parts")
