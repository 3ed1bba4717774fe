"""Durable file primitives: fsync helpers and write-to-temp-then-rename.

Below checkpoints, data and the method alike (each writes files that must survive a crash), so it
lives at the package root rather than inside `checkpoint/`.

``os.replace`` is atomic on POSIX, but without fsyncs a power loss or kernel crash can still
leave a renamed file empty or a rename forgotten. So: fsync the data before the rename, and the
directory after it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import secrets
from pathlib import Path
from typing import Any

# Some filesystems (certain network and FUSE mounts) cannot fsync a directory; there is nothing
# better to do there than to carry on.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a file's data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (creations, renames, deletions) to stable storage."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def mkdir_durable(path: str | os.PathLike[str]) -> None:
    """`mkdir -p path`, fsyncing the parent of every directory it creates, so a crash right after
    cannot forget the new directory (and with it everything written inside)."""
    path = Path(path)
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:  # another process (rank) created it first; still fsync below
            pass
        fsync_dir(directory.parent)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """fsync every file and directory under ``root`` (``root`` included), children first."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if not os.path.islink(path):
                fsync_file(path)
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a mix.

    The temporary file lives in the same directory (rename is only atomic within a filesystem)
    and is removed if anything fails.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically replace ``path`` with ``text`` (UTF-8); see ``atomic_write_bytes``."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> None:
    """Atomically replace ``path`` with ``obj`` as JSON (keys sorted, trailing newline)."""
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def replace_dir(staged: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """Move a fully written, fsynced `staged` directory to `final`. An existing `final` is moved
    aside first and deleted afterwards, so readers find the old tree or the new one, never a mix."""
    staged, final = os.fspath(staged), os.fspath(final)
    aside = None
    if os.path.exists(final):
        aside = f"{os.path.dirname(final) or '.'}/.{os.path.basename(final)}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(final, aside)
    os.replace(staged, final)
    fsync_dir(os.path.dirname(final) or ".")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
