"""Independent pieces of work, run here one after another or spread over a cluster's workers.

A run scores its samples, and an analysis's `finalize` runs its heavy loops (retrieval's masking test, the circuits'
faithfulness, the ViT pruning curves), as `fan_out(fn, model, items)`: `fn(model, item)` for every item, each
independent of the others. In one process that is a plain loop; inside `spread_over(executor)` (what a cluster run
sets up) the items go to the workers, each of which holds its own copy of the model. `fn` must be a module-level
function (it travels to the workers by name) and the items plain, picklable values.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from .progress import QUIET, Progress


class Executor(Protocol):
    def map(self, fn: Callable, model, items: Sequence) -> Iterator[tuple[int, Any]]:
        """(index into items, fn(model, item)) for every item, as each finishes (in any order)."""
        ...


class Local:
    """Runs the items here, in order, on the given model."""

    def map(self, fn: Callable, model, items: Sequence) -> Iterator[tuple[int, Any]]:
        for j, item in enumerate(items):
            yield j, fn(model, item)


LOCAL = Local()
_CURRENT: ContextVar[Executor] = ContextVar("interp_executor", default=LOCAL)


def current() -> Executor:
    """The executor `fan_out` uses now (LOCAL unless inside `spread_over`)."""
    return _CURRENT.get()


@contextmanager
def spread_over(executor: Executor):
    """Within the block, `fan_out` sends its items to `executor`."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


def fan_out(fn: Callable, model, items: Sequence, progress: Progress = QUIET, desc: str = "") -> list:
    """[fn(model, item) for item in items], in the items' order, with a progress bar; on the current executor."""
    out: list = [None] * len(items)
    with progress.bar(total=len(items), desc=desc, leave=False) as bar:
        for j, result in current().map(fn, model, items):
            out[j] = result
            bar.update(1)
    return out
