"""Fault injection for crash tests: `STEADYVLA_FAULT=<point>@<step>[:<action>]` fails the process there.

Used by the resume tests to fail at moments a random kill rarely hits (e.g. half-way through writing a
checkpoint). Actions: none (SIGKILL the process), `kill-once` (SIGKILL only if the file named by
STEADYVLA_FAULT_MARKER does not exist yet, creating it: a restarted process runs on), `enospc` (raise
"No space left on device" every time the point is reached), `enospc-once` (only the first time, so a
retry succeeds), `oom` (raise torch.OutOfMemoryError, as a CUDA allocation failure would). Unset in
normal runs, where `fault_point` is a dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

FAULT_ENV = "STEADYVLA_FAULT"
FAULT_MARKER_ENV = "STEADYVLA_FAULT_MARKER"
_fired: set[str] = set()


def fault_point(name: str, step: int) -> None:
    """Fail here as STEADYVLA_FAULT says, if it names this point and step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, action = spec.partition(":")
    if point != f"{name}@{step}":
        return
    if action == "kill-once":
        marker = os.environ[FAULT_MARKER_ENV]
        if os.path.exists(marker):
            return
        open(marker, "w").close()
        action = ""
    if not action:
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {FAULT_ENV})")
    if action not in ("enospc", "enospc-once"):
        raise ValueError(f"{FAULT_ENV}={spec!r}: unknown action {action!r} (none, kill-once, enospc, enospc-once, "
                         "oom)")
    if action == "enospc-once" and point in _fired:
        return
    _fired.add(point)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"injected by {FAULT_ENV}")
