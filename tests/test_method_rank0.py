"""The Thermostat's probe forward runs on rank 0 only; every rank gets its drift (2 gloo processes)."""

import json
import os
from types import SimpleNamespace

import torch.distributed as dist
import torch.multiprocessing as mp

from steadyvla.method.hook import MethodHook
from steadyvla.method.thermostat import Thermostat, ThermostatSettings

PROBE_SIZE, PROBE_BATCH = 6, 4


def _hook_with_fake_probe(rank: int) -> tuple[MethodHook, list[int]]:
    """A MethodHook whose probe forward is replaced by a counter (rank-specific drift values)."""
    hook = MethodHook.__new__(MethodHook)
    hook.thermostat = Thermostat(ThermostatSettings(update_interval=1, warmup_steps=2, k_beta=1.0, k_gamma=1.0))
    hook.hsw = SimpleNamespace(beta=1.0, gamma=1.0)
    hook.sharded = False  # LoRA / DDP: the probe forward runs on rank 0 only
    hook.probe, hook.probe_batch_size, hook.probe_position, hook.last_drift = [None] * PROBE_SIZE, PROBE_BATCH, 0, None
    calls: list[int] = []

    def measure_drift() -> float:
        calls.append(hook.probe_position)
        hook.probe_position = (hook.probe_position + PROBE_BATCH) % PROBE_SIZE
        return [1.0, 1.0, 3.0, 5.0][len(calls) - 1] if rank == 0 else 1e6

    hook.measure_drift = measure_drift
    return hook, calls


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        hook, calls = _hook_with_fake_probe(rank)
        coefficients = []
        for step in range(4):
            hook.on_step_start(step)
            coefficients.append([hook.hsw.beta, hook.hsw.gamma])
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"calls": calls, "position": hook.probe_position, "coefficients": coefficients,
                       "state": hook.thermostat.state_dict()}, f)
    finally:
        dist.destroy_process_group()


def test_probe_forward_only_on_rank0_and_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["calls"] == [0, 4, 2, 0] and rank1["calls"] == []
    assert rank1["position"] == rank0["position"]  # the probe sampler stays in step on every rank
    assert rank1["state"] == rank0["state"]
    assert rank0["coefficients"][3] == [1 / (1 + 4.0), 1 / (1 + 4.0)]  # drift 5 - baseline 1, from rank 0
    assert rank1["coefficients"] == rank0["coefficients"]
