"""The results store: one directory per scoring run, written atomically, read without unpickling anything.

    <store>/<run id>/
        meta.json         model (id, family, config hash), analysis, options, parameters, the sample plan,
                          versions, start / end time, status ("incomplete" until the very end, then "complete")
        heads.parquet     one row per head: layer, head, kv_head, one column per score (complete runs)
        samples.parquet   one row per sample and head: the per-sample details (complete runs)
        <name>.parquet    an analysis's extra tables, listed in meta["tables"] (e.g. retrieval's masking test)
        parts/            Parquet files of each finished sample while the run is incomplete (what --resume keeps):
                          sample-NNNNNN.parquet (its per-head rows, written last) and <name>-NNNNNN.parquet for
                          an analysis's per-sample tables
        arrays/*.safetensors  optional arrays (pooled maps, head outputs)
        inputs/           copies of the user's input files (images, prompt and task files), listed in
                          meta["kept_inputs"] as {recorded path: "inputs/NNNN-name"}: a run replays (the dashboard's
                          attention views) from its own directory, without the originals
        lock              flock-ed by the process writing the run (its pid and host inside, for people)

Every file is written to a temporary name and renamed into place, so a reader sees a whole file or none.
Run ids start with the UTC start time, so they sort by age, and end with random hex, so two runs started in
the same second never clash (the directory is created exclusively). `<store>/.claims/` holds the lock files by
which a sweep claims the combination it scores (`Store.claim`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

from platformdirs import user_data_dir

from .files import MB, open_regular, read_bytes, read_text

FORMAT = 1
TABLES = ("heads", "samples")  # the tables every run has (`export` writes these and the analysis's own)
EXPORT_FORMATS = ("csv", "parquet", "json")
KEPT_INPUT_LIMIT = 256 * MB  # per file: as large as any input file the analyses read
_REQUIRED = ("format", "id", "status", "analysis", "model", "options", "params", "plan", "started")


class StoreError(ValueError):
    """A problem with the results store (not writable, a run that cannot be written)."""


class RunNotFoundError(StoreError):
    """No run with that id or path."""


class CorruptRunError(StoreError):
    """A run directory whose files cannot be read back."""


def default_store() -> Path:
    """`$INTERP_STORE`, else the user's data directory (`~/.local/share/interp/runs` on Linux)."""
    env = os.environ.get("INTERP_STORE")
    if env:
        return Path(env).expanduser()
    return Path(user_data_dir("interp")) / "runs"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, obj) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    _atomic_write(path, lambda p: df.to_parquet(p, index=False))


def read_parquet(path: Path) -> pd.DataFrame:
    """Parquet through pyarrow: plain columns, nothing unpickled; a regular file of at most TABLE_LIMIT bytes."""
    import pyarrow.parquet as pq  # lazily: listing runs reads JSON only, and must start fast

    with open_regular(path, TABLE_LIMIT) as f:  # the file checked is the file read
        return pq.read_table(f).to_pandas()


META_LIMIT = 64 * MB
TABLE_LIMIT = 8192 * MB


def _now() -> str:
    """UTC time, ISO 8601 with microseconds (runs started in the same second still sort by age)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class RunInfo:
    """One line of a listing: what can be said of a run directory, even a broken one."""

    id: str
    path: Path
    status: str
    meta: dict | None = None
    error: str | None = None

    @property
    def started(self) -> str:
        return (self.meta or {}).get("started", "")

    @property
    def progress(self) -> tuple[int, int]:
        """(finished samples, planned samples)."""
        if self.meta is None:
            return 0, 0
        total = len(self.meta.get("plan", []))
        if self.status == "complete":
            return total, total
        return len(_part_indices(self.path)), total

    def to_json(self) -> dict:
        m = self.meta or {}
        done, total = self.progress
        return {"id": self.id, "path": str(self.path), "status": self.status, "error": self.error,
                "analysis": m.get("analysis"), "model": (m.get("model") or {}).get("name"),
                "family": (m.get("model") or {}).get("family"), "started": m.get("started"),
                "finished": m.get("finished"), "samples_done": done, "samples": total}


def _part_indices(path: Path) -> set[int]:
    parts = path / "parts"
    if not parts.is_dir():
        return set()
    return {int(p.stem[7:]) for p in parts.glob("sample-*.parquet") if p.stem[7:].isdigit()}


def _take_lock(path: Path) -> int | None:
    """An open descriptor holding the run's exclusive lock (`flock`: the kernel drops it when the process dies),
    or None when another process holds it. A reader's probe (a shared lock, for an instant) is waited out."""
    fd = os.open(path / "lock", os.O_CREAT | os.O_RDWR, 0o644)
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            time.sleep(0.01 * (attempt < LOCK_ATTEMPTS - 1))
    os.close(fd)
    return None


LOCK_ATTEMPTS = 20  # × 10 ms: longer than any reader's probe, far shorter than a writer holds the lock


def _is_locked(path: Path) -> bool:
    """Whether some process is writing the run now: a writer holds the exclusive lock, so a shared one cannot be
    had. Readers probe with shared locks, which never conflict with each other (two listings at once do not
    see each other as writers)."""
    try:
        fd = os.open(path / "lock", os.O_RDONLY)
    except OSError:  # no lock file: nobody has written the run since it finished or was created
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases the probe
    return False


def read_meta(path: Path) -> dict:
    """A run's meta.json, checked; CorruptRunError with the reason otherwise."""
    file = path / "meta.json"
    if not file.exists():
        raise CorruptRunError(f"run {path.name}: meta.json is missing ({path} is not a run, or its creation was cut off)")
    try:
        meta = json.loads(read_text(file, META_LIMIT))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptRunError(f"run {path.name}: meta.json cannot be read ({e})") from e
    if not isinstance(meta, dict):
        raise CorruptRunError(f"run {path.name}: meta.json is not a JSON object")
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise CorruptRunError(f"run {path.name}: meta.json lacks {', '.join(missing)}")
    types = {"id": str, "status": str, "analysis": str, "model": dict, "options": dict, "params": dict, "plan": list,
             "started": str, "scores": dict, "tables": list}
    wrong = [k for k, t in types.items() if k in meta and not isinstance(meta[k], t)]
    if wrong or not isinstance(meta["model"].get("name"), str):
        raise CorruptRunError(f"run {path.name}: meta.json has malformed {', '.join(wrong) or 'model name'}")
    if any(not isinstance(t, str) or not t.isidentifier() for t in meta.get("tables", [])):
        raise CorruptRunError(f"run {path.name}: meta.json lists malformed table names")
    if meta["format"] != FORMAT:
        raise CorruptRunError(f"run {path.name}: store format {meta['format']!r}, this interp reads format {FORMAT}")
    if meta["status"] not in ("complete", "incomplete"):
        raise CorruptRunError(f"run {path.name}: unknown status {meta['status']!r}")
    return meta


def is_atlas(meta: dict | None) -> bool:
    """Whether a store entry's meta.json is a head atlas's (`interp.atlases.save_atlas`) rather than a run's."""
    return (meta or {}).get("kind") == "atlas"


def with_kept_inputs(meta: dict, path: Path) -> dict:
    """`meta` with every recorded input path in its plan and parameters (a value, or one part of an "a,b" value)
    replaced by the run's own copy under `path` (see `RunWriter.keep_inputs`); paths it did not keep stay as they
    are."""
    kept = {recorded: str(Path(path) / name) for recorded, name in meta.get("kept_inputs", {}).items()
            if isinstance(name, str) and name.startswith("inputs/") and "/" not in name[7:]
            and name[7:] not in ("", ".", "..")}

    def local(value):
        if isinstance(value, dict):
            return {k: local(v) for k, v in value.items()}
        if isinstance(value, list):
            return [local(v) for v in value]
        if isinstance(value, str) and kept:
            if value in kept:  # a whole path (an image's may hold commas)
                return kept[value]
            return ",".join(kept.get(part.strip(), part) for part in value.split(","))
        return value

    return {**meta, "plan": local(meta["plan"]), "params": local(meta["params"])}


def read_table(path: Path, name: str) -> pd.DataFrame:
    try:
        return read_parquet(path / name)
    except FileNotFoundError as e:
        raise CorruptRunError(f"run {path.name}: {name} is missing") from e
    except Exception as e:  # pyarrow raises several types for damaged files
        raise CorruptRunError(f"run {path.name}: {name} cannot be read ({type(e).__name__}: {e})") from e


def read_parts(path: Path, name: str = "sample") -> pd.DataFrame | None:
    """One per-sample table of the samples an incomplete run has finished, concatenated (None when none)."""
    files = [p for p in sorted((path / "parts").glob(f"{name}-*.parquet")) if p.stem[len(name) + 1:].isdigit()]
    frames = [read_table(path, f"parts/{p.name}") for p in files]
    if not frames:
        return None
    import pandas as pd  # lazily, as in read_parquet

    return pd.concat(frames, ignore_index=True)


_STOPPED: dict[str, None] = {}  # ids of the runs this process stopped before they were complete, oldest first


def stopped_runs() -> list[str]:
    """Ids of the runs this process left incomplete (an error or an interruption stopped them; none finished since):
    what an interrupted command can truthfully say it left behind."""
    return list(_STOPPED)


class Store:
    """A directory of runs. `root` defaults to `default_store()`."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_store()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def check_writable(self) -> None:
        """Raise StoreError unless runs can be created here (checked before any work starts)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}-{secrets.token_hex(4)}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"cannot write runs to {self.root}: {e.strerror or e}") from e

    def runs(self) -> list[RunInfo]:
        """Every run, newest first. Never raises for a broken run: it is listed with status "corrupt". A store
        path that exists but is not a folder is an error (not an empty store)."""
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} is not a folder: give a store directory")
        if not self.root.is_dir():
            return []
        out = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.name.startswith("."):
                continue
            try:
                meta = read_meta(path)
            except CorruptRunError as e:
                out.append(RunInfo(path.name, path, "corrupt", error=str(e)))
                continue
            status = meta["status"]
            if status == "incomplete" and _is_locked(path):
                status = "running"
            out.append(RunInfo(path.name, path, status, meta=meta, error=meta.get("error")))
        return sorted(out, key=lambda r: (r.started or "", r.id), reverse=True)

    def find(self, run: str | os.PathLike) -> Path:
        """The directory of a run given by id, unique id prefix, or path."""
        given = Path(run).expanduser()
        if given.is_dir() and (given / "meta.json").exists():
            return given
        name = str(run)
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise RunNotFoundError(f"no run {name!r}: give a run id, a unique prefix of one, or a run directory")
        if (self.root / name).is_dir():
            return self.root / name
        matches = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(name)] if self.root.is_dir() else []
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise RunNotFoundError(f"run id {run!r} is ambiguous in {self.root}: {', '.join(sorted(p.name for p in matches))}")
        raise RunNotFoundError(f"no run {str(run)!r} in {self.root} (see `interp runs --store {self.root}`)")

    def create(self, meta: dict, slug: str) -> RunWriter:
        """A new run holding `meta` with status "incomplete", locked. It is built in a hidden directory (created
        exclusively) and renamed into place, so listings never see a run without its meta.json."""
        self.check_writable()
        for _ in range(100):
            run_id = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{slug}-{secrets.token_hex(3)}"
            building = self.root / f".{run_id}.new"
            if (self.root / run_id).exists():
                continue
            try:
                building.mkdir()
                break
            except FileExistsError:
                continue
        else:  # pragma: no cover - 100 collisions of 24 random bits
            raise StoreError(f"could not create a fresh run directory in {self.root}")
        writer = RunWriter(building)
        try:
            writer.lock()
            writer.meta = {"format": FORMAT, "id": run_id, "status": "incomplete", **meta, "started": _now(),
                           "finished": None, "error": None}
            writer.save_meta()
            os.rename(building, self.root / run_id)  # the lock's descriptor stays valid
        except BaseException as e:  # a full disk, an interruption: no hidden half-built folder is left
            writer.unlock()
            shutil.rmtree(building, ignore_errors=True)
            if isinstance(e, OSError):
                raise StoreError(f"cannot create a run in {self.root}: {e.strerror or e}") from e
            raise
        writer.path = self.root / run_id
        return writer

    @contextmanager
    def claim(self, combination: dict, wait: bool = False) -> Iterator[bool]:
        """Hold `combination` (a run's analysis, model, options and parameters, as its meta.json records them)
        while this process scores it: yields True, or False when another process holds it (with `wait`: once it is
        free, True). A sweep skips, or waits for, what another is scoring. The lock is a `flock` on a file under
        `.claims/`, which the kernel drops when the holder dies."""
        key = hashlib.sha256(json.dumps(combination, sort_keys=True, default=str).encode()).hexdigest()[:32]
        (self.root / ".claims").mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / ".claims" / key, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)  # closing releases the lock

    def reopen(self, run: str | os.PathLike) -> RunWriter:
        """An incomplete run, locked for this process to finish."""
        path = self.find(run)
        writer = RunWriter(path)
        writer.lock()
        try:
            meta = read_meta(path)  # read under the lock: another writer may have just finished it
            if meta["status"] == "complete":
                raise StoreError(f"run {path.name} is already complete; nothing to resume")
        except StoreError:
            writer.unlock()
            raise
        writer.meta = meta
        return writer


class RunWriter:
    """Writes one run: per-sample parts as they finish, then the final tables, then status "complete"."""

    def __init__(self, path: Path):
        self.path = path
        self.meta: dict = {}
        self._lock_fd: int | None = None

    @property
    def id(self) -> str:
        return self.path.name

    def lock(self) -> None:
        fd = _take_lock(self.path)
        if fd is None:
            raise StoreError(f"run {self.id} is being written by another process")
        self._lock_fd = fd  # held from here: `unlock` releases it whatever fails next
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode())

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def save_meta(self) -> None:
        write_json(self.path / "meta.json", self.meta)

    def done(self) -> set[int]:
        """Indices of the samples already finished (their parts are on disk)."""
        return _part_indices(self.path)

    def write_sample(self, index: int, rows: pd.DataFrame, tables: dict[str, pd.DataFrame] | None = None) -> None:
        """Save one finished sample: its per-head rows and its per-sample tables (the rows last: they mark it done)."""
        (self.path / "parts").mkdir(exist_ok=True)
        for name, table in (tables or {}).items():
            if not name.isidentifier() or name == "sample":
                raise StoreError(f"malformed per-sample table name {name!r}")
            write_parquet(self.path / "parts" / f"{name}-{index:06d}.parquet", table)
        write_parquet(self.path / "parts" / f"sample-{index:06d}.parquet", rows)

    def samples(self) -> pd.DataFrame | None:
        return read_parts(self.path)

    def sample_tables(self, names) -> dict[str, pd.DataFrame]:
        """The named per-sample tables of the finished samples, each concatenated (absent when no sample has one)."""
        found = {name: read_parts(self.path, name) for name in names}
        return {name: t for name, t in found.items() if t is not None}

    def write_arrays(self, name: str, tensors: dict) -> Path:
        """Save named tensors as `arrays/<name>.safetensors`."""
        from safetensors.torch import save_file

        (self.path / "arrays").mkdir(exist_ok=True)
        target = self.path / "arrays" / f"{name}.safetensors"
        _atomic_write(target, lambda p: save_file({k: v.contiguous() for k, v in tensors.items()}, str(p)))
        return target

    def keep_inputs(self, paths) -> None:
        """Copy each named user file (a path as recorded in the plan or parameters) into `inputs/`, and record the
        copies in meta["kept_inputs"]. Only regular files up to KEPT_INPUT_LIMIT bytes are read."""
        kept = {}
        for i, recorded in enumerate(dict.fromkeys(paths)):
            source = Path(recorded).expanduser()
            data = read_bytes(source, KEPT_INPUT_LIMIT)  # bounded even if the file grows or is swapped meanwhile
            (self.path / "inputs").mkdir(exist_ok=True)
            name = f"inputs/{i:04d}-{source.name[-80:]}"
            _atomic_write(self.path / name, lambda p, data=data: p.write_bytes(data))
            kept[recorded] = name
        if kept:
            self.meta["kept_inputs"] = kept
            self.save_meta()

    def fail(self, error: str) -> None:
        """Record why the run stopped; it stays "incomplete" and resumable (and listed in `stopped_runs`)."""
        self.meta["error"] = error
        _STOPPED.setdefault(self.id)
        self.save_meta()

    def discard(self) -> None:
        """Remove a run that this process created and that holds no finished sample (nothing is lost)."""
        if self.done():
            raise StoreError(f"run {self.id} holds finished samples: it is kept")
        self.unlock()
        shutil.rmtree(self.path, ignore_errors=True)

    def finish(self, heads: pd.DataFrame, samples: pd.DataFrame, tables: dict[str, pd.DataFrame],
               report: list[str]) -> None:
        """Write the final tables (and the analysis's extra ones as `<name>.parquet`) and the report's lines, then
        mark the run complete."""
        for name, table in tables.items():
            write_parquet(self.path / f"{name}.parquet", table)
        write_parquet(self.path / "samples.parquet", samples)
        write_parquet(self.path / "heads.parquet", heads)
        self.meta.update(status="complete", finished=_now(), error=None, tables=sorted(tables), report=report)
        self.save_meta()  # the rename that makes the run complete
        _STOPPED.pop(self.id, None)
        shutil.rmtree(self.path / "parts", ignore_errors=True)
        (self.path / "lock").unlink(missing_ok=True)  # a later writer re-reads meta under its lock and stops
