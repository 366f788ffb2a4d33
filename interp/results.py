"""`ScoreResult`: a scored run as tables (pandas) and figures, read from the store or just computed."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from .store import (EXPORT_FORMATS, TABLES, CorruptRunError, RunInfo, Store, read_meta, read_parts, read_table,  # noqa: F401
                    with_kept_inputs, write_parquet, write_text)



@dataclass
class ScoreResult:
    """What one analysis found on one model.

    heads: one row per head — `layer`, `head`, `kv_head`, then one column per score (`scores`).
    samples: one row per sample and head — `sample` and the analysis's per-sample columns.
    meta: the run's description (model, analysis, options, parameters, plan, versions, times, status).
    path: the run directory, or None for a result kept in memory.
    tables: the analysis's extra tables by name (e.g. retrieval's "masking").
    """

    meta: dict
    heads: pd.DataFrame
    samples: pd.DataFrame
    path: Path | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def id(self) -> str | None:
        return self.meta.get("id")

    @property
    def analysis(self) -> str:
        return self.meta["analysis"]

    @property
    def status(self) -> str:
        return self.meta.get("status", "complete")

    @property
    def samples_done(self) -> int:
        """How many of the planned samples are in `samples`."""
        return int(self.samples["sample"].nunique()) if len(self.samples) else 0

    def counted(self) -> tuple[int, int, str]:
        """(done, planned, unit): what the run's progress counts, samples, or prompts where each planned sample is a
        batch of prompts (circuits)."""
        plan = self.meta["plan"]
        if plan and all(isinstance(s, dict) and isinstance(s.get("prompts"), list) for s in plan):
            done = set(self.samples["sample"].astype(int)) if len(self.samples) else set()
            return sum(len(plan[i]["prompts"]) for i in done), sum(len(s["prompts"]) for s in plan), "prompts"
        return self.samples_done, len(plan), "samples"

    @property
    def scores(self) -> list[str]:
        """The score columns, in the analysis's order."""
        return list(self.meta["scores"])

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return (f"ScoreResult({self.analysis!r} on {self.meta['model']['name']!r}, {len(self.heads)} heads, "
                f"scores={self.scores}, status={self.status!r}{where})")

    def to_dataframe(self) -> pd.DataFrame:
        """The heads table: `layer`, `head`, `kv_head`, one column per score."""
        return self.heads.copy()

    def top(self, score: str | None = None, k: int = 10, ascending: bool = False) -> pd.DataFrame:
        """The k heads with the highest (or lowest) `score` (default: the analysis's first score); by |score| for an
        analysis whose scores are signed effects (circuits: a negative effect is as important as a positive one)."""
        score = score or self.scores[0]
        if score not in self.heads.columns:
            raise ValueError(f"no score {score!r}; this {self.analysis} result has: {', '.join(self.scores)}")
        cols = ["layer", "head", "kv_head", score]
        signed = self.meta.get("signed")
        if signed is None:  # a run written before runs recorded it
            from interp.analyses import ANALYSES

            signed = getattr(ANALYSES.get(self.analysis), "signed", False)
        ranked = self.heads.dropna(subset=[score]).sort_values(score, ascending=ascending, kind="stable",
                                                               key=abs if signed else None)
        return ranked[cols].head(k).reset_index(drop=True)

    def sample_column(self, score: str) -> str:
        """The samples-table column that shows `score` sample by sample (as the run recorded it; for a run written
        before runs recorded it, as its analysis says)."""
        recorded = self.meta.get("sample_columns")
        if recorded is None:
            from interp.analyses import ANALYSES

            analysis = ANALYSES.get(self.analysis)
            return analysis.sample_column(score) if analysis else score
        return recorded.get(score, score)

    @property
    def describe(self) -> list[str]:
        """The samples-table columns that say what a sample is (recorded by the run, else its analysis's)."""
        if "describe" in self.meta:
            return list(self.meta["describe"])
        from interp.analyses import ANALYSES

        return list(getattr(ANALYSES.get(self.analysis), "describe", ()))

    @property
    def kept_plan(self) -> list[dict]:
        """The plan with every user input (an image, a prompts file) at the run's own copy, where it kept one."""
        return (with_kept_inputs(self.meta, self.path) if self.path is not None else self.meta)["plan"]

    def view(self) -> list:
        """The analysis's own figures and `Note`s for this run (the dashboard's analysis tab)."""
        from interp.analyses import get_analysis

        return get_analysis(self.analysis).view(self)

    def plot(self, score: str | None = None):
        """A layer × head heatmap of `score` (plotly Figure), the same figure the dashboard shows."""
        from interp.app.figures import head_map

        score = score or self.scores[0]
        model = self.meta["model"]["name"]
        return head_map(self.heads, score, title=f"{self.analysis}: {score} — {model}")

    @property
    def table_names(self) -> list[str]:
        """Every table of the run: heads, samples, then the analysis's own (masking, faithfulness, …)."""
        return [*TABLES, *self.tables]

    def table(self, name: str) -> pd.DataFrame:
        """The run's table `name` (one of `table_names`)."""
        if name not in self.table_names:
            more = ("" if self.status == "complete" else
                    f" (this run is {self.status}: its analysis tables come at the end)")
            raise ValueError(f"run {self.id} has no table {name!r}; it has: {', '.join(self.table_names)}{more}")
        return {"heads": self.heads, "samples": self.samples, **self.tables}[name]

    def export(self, path: str | os.PathLike | None, format: str = "csv", table: str = "heads") -> None:
        """Write one of the run's tables (`table_names`) as csv, parquet or json (records). path None or "-": standard
        output (parquet only when it is not a terminal). A file is replaced atomically; a path that exists and is not a
        regular file (a device, a FIFO, a symlink, a folder), or that lies inside the run's store, is refused."""
        if format not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
        df = self.table(table)
        if path is None or str(path) == "-":
            if format == "parquet":
                if sys.stdout.isatty():
                    raise ValueError("parquet is binary: give an output file, or redirect standard output")
                sys.stdout.flush()
                df.to_parquet(sys.stdout.buffer, index=False)
                sys.stdout.buffer.flush()
                return
            text = df.to_csv(index=False) if format == "csv" else df.to_json(orient="records", indent=1)
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
            return
        path = self._export_target(Path(path).expanduser())
        if format == "parquet":
            write_parquet(path, df)
        elif format == "csv":
            write_text(path, df.to_csv(index=False))
        else:
            write_text(path, df.to_json(orient="records", indent=1) + "\n")

    def _export_target(self, path: Path) -> Path:
        """`path`, after refusing what an export must not replace."""
        if path.is_symlink() or (path.exists() and not path.is_file()):
            kind = "a symlink" if path.is_symlink() else "a folder" if path.is_dir() else "not a regular file"
            raise ValueError(f"{path} is {kind}: export writes regular files only (or '-' for standard output)")
        if self.path is not None:
            store = Path(self.path).resolve().parent
            if path.resolve().is_relative_to(store):
                raise ValueError(f"{path} lies inside the store {store}: export elsewhere, a run's files are "
                                 "written by interp only")
        return path


def list_runs(store: str | os.PathLike | Store | None = None) -> list[RunInfo]:
    """Every run in a store, newest first; broken runs are listed with status "corrupt" and the reason."""
    return as_store(store).runs()


def open_run(run: str | os.PathLike, store: str | os.PathLike | Store | None = None) -> ScoreResult:
    """A stored run, by id, unique id prefix or path. An incomplete run gives the heads table of the
    samples it has finished (status "incomplete"). CorruptRunError when its files cannot be read."""
    path = as_store(store).find(run)
    meta = read_meta(path)
    if meta["status"] == "complete":
        tables = {name: read_table(path, f"{name}.parquet") for name in meta.get("tables", [])}
        return ScoreResult(meta, read_table(path, "heads.parquet"), read_table(path, "samples.parquet"), path, tables)
    from interp.analyses import ANALYSES  # only an incomplete run needs its analysis, to aggregate its samples

    analysis = ANALYSES.get(meta["analysis"])
    if analysis is None:
        raise CorruptRunError(f"run {path.name}: analysis {meta['analysis']!r} is unknown to this interp")
    samples = read_parts(path)
    if samples is None:
        heads = pd.DataFrame(columns=["layer", "head", "kv_head", *meta["scores"]])
        samples = pd.DataFrame(columns=["sample", "layer", "head", "kv_head"])
    else:
        heads = analysis.aggregate(samples, analysis.stored_params(meta))
    return ScoreResult(meta, heads, samples, path)


def as_store(store: str | os.PathLike | Store | bool | None) -> Store:
    """A Store from a directory, a Store, or None / True (the default store)."""
    if isinstance(store, Store):
        return store
    return Store(None if store is None or store is True else store)
