"""Fault injection for crash tests: `STEADYVLA_FAULT=<point>@<step>` SIGKILLs the process there.

Used by the resume tests to die at moments a random kill rarely hits (e.g. half-way through
writing a checkpoint). Unset in normal runs, where `fault_point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

FAULT_ENV = "STEADYVLA_FAULT"


def fault_point(name: str, step: int) -> None:
    """SIGKILL this process if STEADYVLA_FAULT names this point and step."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
