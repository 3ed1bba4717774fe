"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next optimizer-step boundary.

SLURM and Kubernetes send SIGTERM (or a configured SIGUSR1) some time before SIGKILL, often to the
whole process group. The first signal sets a flag the loop checks after each optimizer step; a second
one exits at once, unless it comes within `DUPLICATE_WINDOW_S` of the first (the same preemption
delivered twice: once to the group, once forwarded by a launcher such as torchrun).

DataLoader workers ignore these signals (`ignore_preemption_signals` is their worker_init_fn):
killed first, they would take the main process down with "DataLoader worker ... killed by signal"
before it could save. The main process decides; the workers end with it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
DUPLICATE_WINDOW_S = 2.0


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: this worker ignores SIGTERM/SIGUSR1 (the main process handles them).

    It replaces the handler torch installs in workers, under which a SIGTERM from anyone but the
    parent kills the worker."""
    for sig in PREEMPT_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class PreemptionFlag:
    """Installs the handlers; `requested` tells the loop to save and stop."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def install(self) -> "PreemptionFlag":
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None and time.monotonic() - self._first_at < DUPLICATE_WINDOW_S:
            return  # the same preemption, delivered again (process group + launcher)
        if self.requested is not None:
            sys.stderr.write(f"\nsteadyvla: second {name}: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
        self._first_at = time.monotonic()
        sys.stderr.write(
            f"\nsteadyvla: {name} received: saving a checkpoint at the end of this optimizer step, "
            "then exiting (send it again to exit at once)\n"
        )
        sys.stderr.flush()
