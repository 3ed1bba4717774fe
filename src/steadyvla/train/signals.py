"""Preemption: SIGTERM / SIGUSR1 ask for a checkpoint at the next optimizer-step boundary.

SLURM and Kubernetes send SIGTERM (or a configured SIGUSR1) some time before SIGKILL. The first
signal sets a flag the loop checks after each optimizer step; a second one exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs the handlers; `requested` tells the loop to save and stop."""

    def __init__(self) -> None:
        self.requested: int | None = None
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
        if self.requested is not None:
            sys.stderr.write(f"\nsteadyvla: second {name}: exiting now without saving\n")
            sys.stderr.flush()
            os._exit(128 + signum)
        self.requested = signum
        sys.stderr.write(
            f"\nsteadyvla: {name} received: saving a checkpoint at the end of this optimizer step, "
            "then exiting (send it again to exit at once)\n"
        )
        sys.stderr.flush()
