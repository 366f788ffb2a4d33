"""Reading files that someone else named (a run's files, the user's prompts and images) without hanging or
exhausting memory: only regular files, up to a size limit."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

MB = 1 << 20


class UnreadableFileError(OSError):
    """Not a regular file, or larger than the limit (the message says which)."""


_confined_to: ContextVar[Path | None] = ContextVar("confined_to", default=None)


@contextmanager
def confined(root: str | os.PathLike) -> Iterator[None]:
    """Within the block, files are read only below `root` (after following symlinks): what a run recorded (an
    image path, a prompts file) cannot make the dashboard read anything else on the machine."""
    token = _confined_to.set(Path(root).resolve())
    try:
        yield
    finally:
        _confined_to.reset(token)


def check_regular(path: str | os.PathLike, limit: int) -> int:
    """The size of `path` in bytes, after refusing anything but a regular file (a FIFO or a device would hang or
    never end), anything larger than `limit` bytes, and, inside `confined(root)`, anything outside root."""
    root = _confined_to.get()
    if root is not None and not Path(path).resolve().is_relative_to(root):
        raise UnreadableFileError(f"{path} lies outside the store {root}: a run's views read only the run's own files")
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFileError(f"{path} is not a regular file")
    if st.st_size > limit:
        raise UnreadableFileError(f"{path} is larger than {limit // MB} MB")
    return st.st_size


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (refused otherwise, even if it grows meanwhile)."""
    check_regular(path, limit)
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFileError(f"{path} is larger than {limit // MB} MB")
    return data


def read_text(path: str | os.PathLike, limit: int) -> str:
    return read_bytes(Path(path), limit).decode("utf-8")
