"""Rank 0 runs the periodic evaluation; the other ranks stay with it through broadcasts.

Rank 0 alone steps the simulator. Every other rank sits in a loop of `broadcast_object_list`
calls that rank 0 answers with one of four messages:

- `alive`: rank 0 is still working (sent at least every HEARTBEAT_S seconds, so that no
  collective times out during a long evaluation);
- `query`: the inputs of the next policy call. Under FSDP the weights are sharded, so every rank
  must run the same forwards for rank 0's to complete; the others run it on the same inputs and
  drop the result. Under DDP every rank holds all the weights, so rank 0 sends no queries;
- `done` with the result, or `failed` with rank 0's error (the others raise too).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from steadyvla.distributed import DistEnv

HEARTBEAT_S = 60.0  # collectives time out after minutes
ALIVE, QUERY, DONE, FAILED = "alive", "query", "done", "failed"


class RankLink:
    """Rank 0's side of the link (a no-op without other ranks)."""

    def __init__(self, send: Callable[[str, Any], None] | None = None):
        self._send = send
        self._last = time.monotonic()

    def beat(self) -> None:
        """Tell the waiting ranks rank 0 is alive, if HEARTBEAT_S passed since the last message."""
        if self._send is not None and time.monotonic() - self._last >= HEARTBEAT_S:
            self._message(ALIVE, None)

    def share(self, query: Any) -> None:
        """Hand the other ranks the inputs of a forward they must join (also a heartbeat)."""
        if self._send is not None:
            self._message(QUERY, query)

    def _message(self, kind: str, payload: Any) -> None:
        self._send(kind, payload)
        self._last = time.monotonic()


def from_rank0(work: Callable[[RankLink], Any], env: DistEnv,
               follow: Callable[[Any], None] | None = None) -> Any:
    """`work(link)` on rank 0; its result on every rank. The other ranks wait, calling `follow(query)`
    for each query rank 0 shares (a query without `follow` is a programming error)."""
    if not env.distributed:
        return work(RankLink())
    import torch.distributed as dist

    def send(kind: str, payload: Any) -> None:
        dist.broadcast_object_list([(kind, payload)], src=0)

    if env.is_main:
        link = RankLink(send)
        try:
            result = work(link)
        except BaseException as err:
            send(FAILED, f"{type(err).__name__}: {err}")
            raise
        send(DONE, result)
        return result
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        kind, payload = box[0]
        if kind == DONE:
            return payload
        if kind == FAILED:
            raise RuntimeError(f"periodic evaluation failed on rank 0 ({payload}); see rank 0's error")
        if kind == QUERY:
            if follow is None:
                raise RuntimeError("rank 0 shared a policy query, but this rank has no forward to join")
            follow(payload)
