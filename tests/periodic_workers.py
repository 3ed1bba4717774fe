"""Worker processes of tests/test_periodic_eval.py, in a module of their own: a spawned process
imports the module its function lives in, and this one imports little."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

import steadyvla.eval.rank_link as rank_link
from steadyvla.distributed import DistEnv


def broadcast_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: rank 0's heartbeats, shared queries (which rank 1 follows, in order),
    result and failure reach rank 1 through `from_rank0`."""
    rank_link.HEARTBEAT_S = 0.0  # every heartbeat call is a broadcast the waiting rank must answer
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world_size=2)
    followed: list = []

    def work(link):
        for i in range(3):
            link.beat()
            link.share({"images": [i, i + 1]})
        return {"score": 0.5}

    def failing(link):
        link.beat()
        raise ValueError("renderer gone")

    got = rank_link.from_rank0(work, env, follow=followed.append)
    try:
        rank_link.from_rank0(failing, env)
        error = None
    except (ValueError, RuntimeError) as err:
        error = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"got": got, "followed": followed, "error": error}))
    dist.destroy_process_group()
