"""Reading files that someone else named (a run's files, the user's prompts and images) without hanging or
exhausting memory: only regular files, up to a size limit. Each file is opened once and what was opened is checked
(never a path checked, then opened again: the path may have changed in between)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

MB = 1 << 20
# O_NONBLOCK: opening a FIFO does not wait for a writer (it is then refused as not a regular file)
_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_FOLDER = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class UnreadableFileError(OSError):
    """Not a regular file, larger than the limit, or (confined) outside the root (the message says which)."""


_confined_to: ContextVar[Path | None] = ContextVar("confined_to", default=None)


@contextmanager
def confined(root: str | os.PathLike) -> Iterator[None]:
    """Within the block, files are read only below `root`: what a run recorded (an image path, a prompts file) cannot
    make the dashboard read anything else on the machine. A path's symlinks are followed first; the file is then
    opened from root folder by folder without following any (one changed meanwhile is refused), and must have one
    name only (a hard link could name a file outside root)."""
    token = _confined_to.set(Path(root).resolve())
    try:
        yield
    finally:
        _confined_to.reset(token)


@contextmanager
def unconfined() -> Iterator[None]:
    """Within the block (inside `confined`), files are read anywhere again: for what the dashboard reads of its own
    accord (a model the user allowed it to load), never for a path a run records."""
    token = _confined_to.set(None)
    try:
        yield
    finally:
        _confined_to.reset(token)


def open_regular(path: str | os.PathLike, limit: int) -> BinaryIO:
    """`path` opened for reading (binary), after refusing anything but a regular file (a FIFO or a device would
    hang or never end), anything larger than `limit` bytes, and, inside `confined(root)`, anything outside root:
    UnreadableFileError. The checks are made on the opened file itself."""
    root = _confined_to.get()
    fd = os.open(path, _FLAGS) if root is None else _open_below(root, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(f"{path} is not a regular file")
        if root is not None and st.st_nlink != 1:
            raise UnreadableFileError(f"{path} has {st.st_nlink} names (hard links): a run's views read only files "
                                      f"with one, so that none is a file outside the store {root}")
        if st.st_size > limit:
            raise UnreadableFileError(f"{path} is larger than {limit // MB} MB")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _open_below(root: Path, path: str | os.PathLike) -> int:
    """A descriptor of `path` (symlinks followed first) opened from `root` folder by folder, following no symlink,
    and still named so once opened: a path outside root, or one changed meanwhile, is refused."""
    resolved = Path(os.path.realpath(path))  # never raises for a symlink loop: the walk below refuses it
    outside = UnreadableFileError(f"{path} lies outside the store {root}: a run's views read only the run's own files")
    if not resolved.is_relative_to(root):
        raise outside
    *folders, name = resolved.relative_to(root).parts or (".",)
    folder = os.open(root, _FOLDER)
    try:
        for part in folders:
            inner = os.open(part, _FOLDER, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(name, _FLAGS | os.O_NOFOLLOW, dir_fd=folder)
        if not _named(fd, folder, name):  # renamed or unlinked as it was opened
            os.close(fd)
            raise outside
        return fd
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # a symlink where the resolved path had a folder or the file
            raise outside from e
        raise
    finally:
        os.close(folder)


def _named(fd: int, folder: int, name: str) -> bool:
    """Whether `name` in the open `folder` is the file open as `fd`."""
    try:
        named = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino)


def check_regular(path: str | os.PathLike, limit: int) -> int:
    """The size of `path` in bytes, after the checks of `open_regular` (UnreadableFileError when one fails)."""
    with open_regular(path, limit) as f:
        return os.fstat(f.fileno()).st_size


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (refused otherwise, even if it grows meanwhile)."""
    with open_regular(path, limit) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnreadableFileError(f"{path} is larger than {limit // MB} MB")
    return data


def read_text(path: str | os.PathLike, limit: int) -> str:
    return read_bytes(Path(path), limit).decode("utf-8")
