"""Run checkpoint writes on a background thread, one at a time.

The training loop snapshots tensors to CPU memory synchronously (the only blocking part) and
hands the slow part, serializing and fsyncing, to ``AsyncCheckpointWriter.submit``. A second
submit first waits for the first: two saves in flight would double host memory and could
commit out of order. A failure in the background is never lost: it is raised in the main thread
by the next ``submit`` or ``wait``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class AsyncCheckpointWriter(Generic[T]):
    """At most one background save at a time; errors re-raised in the caller's thread."""

    def __init__(self, name: str = "steadyvla-checkpoint-writer") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._label = ""
        self._started = 0.0
        self._result: Any = None
        self._error: BaseException | None = None
        self.last_elapsed_s: float | None = None  # duration of the last finished save

    @property
    def busy(self) -> bool:
        """True while a save is running in the background."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, fn: Callable[[], T], label: str = "") -> None:
        """Wait for the save in flight (re-raising its error), then start ``fn`` in the background.

        If the previous save failed, its exception is raised here and ``fn`` is not started.
        ``label`` (e.g. the checkpoint name) is added to the error's notes if ``fn`` fails.
        """
        self.wait()
        self._label = label
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), name=self._name)
        # Not a daemon: interpreter exit waits for a save instead of cutting it off mid-write.
        self._thread.start()

    def _run(self, fn: Callable[[], T]) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # re-raised in the main thread by wait()
            self._error = exc
        finally:
            self.last_elapsed_s = time.monotonic() - self._started

    @property
    def finished(self) -> bool:
        """True when a save was submitted and has ended (successfully or not) but was not collected."""
        return self._thread is not None and not self._thread.is_alive()

    def wait(self) -> T | None:
        """Block until the save in flight (if any) is done; return its result or raise its error.

        The original exception is re-raised with its traceback and a note naming the background
        save. Returns None when nothing was in flight.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return None
        thread.join()
        error, self._error = self._error, None
        result, self._result = self._result, None
        if error is not None:
            what = f" {self._label!r}" if self._label else ""
            error.add_note(f"raised by the background checkpoint save{what} "
                           f"({self.last_elapsed_s:.2f}s after it was submitted)")
            raise error
        return result

    def __enter__(self) -> AsyncCheckpointWriter[T]:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.wait()
        elif self._thread is not None:
            self._thread.join()  # let the write finish, but keep the original exception
