"""Worker processes of tests/test_ddp.py's agreement test, in a module of their own: a spawned
process imports the module its function lives in, and this one imports little."""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from steadyvla.distributed import DistEnv, all_ranks, any_rank, control_group, shutdown


def agreement_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: flags agreed on the control group, and which group that is."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    env = DistEnv(rank=rank, world_size=2)
    result = {
        "any": [any_rank(rank == 1, env), any_rank(False, env)],
        "all": [all_ranks(rank == 0, env), all_ranks(True, env)],
        "own_group": control_group() is not dist.group.WORLD,
        "one_group": control_group() is control_group(),
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown(env)
