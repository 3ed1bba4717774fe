"""Leaving after an error even when a background thread would keep the process alive.

A run that failed must end: a scheduler, a supervisor or a person waiting on the process sees its
exit status and the `error:` line. Interpreter exit waits for non-daemon threads (the checkpoint
writers are non-daemon on purpose, so that a normal exit never cuts a save off), and a thread stuck
in a library after an error would hold the process forever (seen once on an H100: a failed
DCP staging left `steadyvla train` running until it was killed). The guard gives them a grace
period, then exits with the error's status and says why.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EXIT_GRACE_S = 120.0  # a save in flight when the error came finishes well within this on a local disk


def exit_after_error(code: int, grace_s: float | None = None) -> None:
    """Make sure the process ends with `code` at most `grace_s` (default EXIT_GRACE_S) seconds from now."""
    grace_s = EXIT_GRACE_S if grace_s is None else grace_s

    def leave() -> None:
        time.sleep(grace_s)
        print(f"steadyvla: still running {grace_s:.0f} s after the error above (a background thread did not "
              f"stop); exiting with status {code}", file=sys.stderr, flush=True)
        os._exit(code)

    threading.Thread(target=leave, name="steadyvla-exit-guard", daemon=True).start()
