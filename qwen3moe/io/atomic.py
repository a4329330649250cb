"""Atomic file and folder writes: write to a temporary path beside the target, then rename.

A reader never sees a half-written file; an interrupted write leaves the old target intact.
New files get the mode a plain `open()` would give (0666 & ~umask), new folders 0777 & ~umask;
a replaced file keeps its own mode. A target the user cannot write (a read-only file, a file in
a read-only folder, a folder where a file is expected) is refused with `OutputError`, also when
running as root, which would otherwise ignore the permission bits.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator

from qwen3moe.errors import Qwen3MoeError


class OutputError(Qwen3MoeError, ValueError):
    """An output path that cannot be written: one line naming it."""


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; restored at once
    os.umask(mask)
    return mask


def _writable(path: str) -> bool:
    """os.access, plus the permission bits themselves: root may write anything, but a file or
    folder nobody may write was made read-only on purpose."""
    return os.access(path, os.W_OK) and bool(os.stat(path).st_mode & 0o222)


def check_output_file(path: str | os.PathLike) -> None:
    """Raise OutputError unless `path` can be (re)placed by an atomic file write.

    Cheap, for checking a command's --output before any work is done."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputError(f"{path}: is a folder, expected a file path")
    if os.path.exists(path) and not _writable(path):
        raise OutputError(f"{path}: not writable (read-only file); choose another path or change its mode")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # created on write: the nearest existing ancestor decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: {parent} is a file, not a folder")
    if not _writable(parent):
        raise OutputError(f"{path}: folder {parent} is not writable")


def new_file_mode(path: str) -> int:
    """The mode a write to `path` should leave: the existing file's, else 0666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_files(directory: str | os.PathLike) -> Iterator[Callable[[str], str]]:
    """Yield `temp(name) -> path`: each call makes a temp file beside `directory/name` to write.
    On success every temp is fsync'ed, given the right mode and renamed onto its name, in the
    order asked for (shards before the index that names them); on any error all temps are
    removed and the targets are untouched."""
    directory = os.path.abspath(os.fspath(directory))
    temps: list[tuple[str, str]] = []

    def temp(name: str) -> str:
        path = os.path.join(directory, name)
        check_output_file(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
        os.close(fd)
        temps.append((tmp, path))
        return tmp

    try:
        yield temp
        for tmp, path in temps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, new_file_mode(path))
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temp path beside `path`; renamed onto it on success, removed on any error."""
    path = os.path.abspath(os.fspath(path))
    with atomic_files(os.path.dirname(path)) as temp:
        yield temp(os.path.basename(path))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with atomic_file(dst) as tmp:
        shutil.copyfile(src, tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces `path` (an existing folder is swapped out
    and deleted). Only for folders this library owns entirely (training `step_*` folders):
    user-facing outputs are written file by file (`atomic_file`) and never replace a folder."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)
