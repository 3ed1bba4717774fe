"""One process owns a run dir at a time: an exclusive `fcntl.flock` on `<run_dir>/run.lock`.

The kernel drops a flock when its holder exits however it exits (kill -9 included), so there is
never a stale lock to clean up by hand. The lock file itself is never deleted (deleting it would let
two processes lock two different inodes); its content only tells a refused start who holds it.

Locks are per process and re-entrant within it: the training entry point holds the run dir for the
life of the run, and the checkpoint manager takes it again around each save (and around removing
leftovers of killed saves), which then costs nothing. A manager used on its own still never cleans
or writes under a live run of another process.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from steadyvla.checkpoint.layout import RUN_LOCK_FILE

_HELD: dict[Path, "RunLock"] = {}  # this process's locks, by resolved run dir


class RunDirBusy(RuntimeError):
    """Another live process holds the run dir; the message names its pid and host."""


def _key(run_dir: Path) -> Path:
    return Path(os.path.realpath(run_dir))


def read_holder(run_dir: Path) -> dict[str, Any]:
    """What the lock file says about its last holder (pid, host, since, argv); {} if nothing readable."""
    try:
        data = json.loads((Path(run_dir) / RUN_LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict[str, Any]) -> str:
    """'pid 123 on host h (since ...)' or a placeholder while the holder has not written it yet."""
    if not holder.get("pid"):
        return "a process that is still starting (pid not recorded yet)"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder['pid']} on host {holder.get('host', '?')}{since}"


def busy_message(run_dir: Path) -> str:
    """The refusal text for a run dir another process holds."""
    return (f"run dir {run_dir} is in use by {describe_holder(read_holder(run_dir))} "
            f"(lock {RUN_LOCK_FILE}). Two processes must not train into one run dir: wait for that run to "
            "finish or stop it, or pick another run_id / run_id_note. `steadyvla ckpt ls|verify` and "
            "`steadyvla doctor` work while it runs")


def is_locked_elsewhere(run_dir: Path) -> bool:
    """True if another process holds the run dir's lock. Read-only: never creates the lock file."""
    if _key(run_dir) in _HELD:
        return False
    try:
        fd = os.open(Path(run_dir) / RUN_LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


class RunLock:
    """This process's exclusive hold on one run dir; use `RunLock.acquire`."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = Path(run_dir)
        self._fd = fd
        self._count = 0
        self.announced = False

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock `run_dir` (which must exist) or raise `RunDirBusy`; re-entrant within a process.

        Creates the lock file if needed but writes nothing into it: `announce()` does that once the
        caller has decided to run, so a start refused for another reason leaves the file as it was.
        """
        key = _key(run_dir)
        lock = _HELD.get(key)
        if lock is None:
            fd = os.open(Path(run_dir) / RUN_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunDirBusy(busy_message(Path(run_dir))) from None
                raise
            lock = _HELD[key] = cls(Path(run_dir), fd)
        lock._count += 1
        return lock

    def announce(self) -> None:
        """Record this process (pid, host, start time, argv) in the lock file for refused starts to name."""
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        data = (json.dumps(info) + "\n").encode("utf-8")
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)
        self.announced = True

    def release(self) -> None:
        """Drop one hold; the last one unlocks (the file stays)."""
        self._count -= 1
        if self._count > 0:
            return
        _HELD.pop(_key(self.run_dir), None)
        os.close(self._fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
