"""CUDA paths (pinned-memory snapshots, CUDA RNG state, method hooks, CUDA graphs on GPU). Skipped without a GPU; run on the GPU machine: `python -m pytest -q tests/test_gpu.py -s`."""

import importlib.util
import signal
from pathlib import Path

import pytest
import torch

from helpers import checkpoint_tensors, config_args, metrics_lines, run_cli
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR
from steadyvla.config import build_config
from steadyvla.faults import FAULT_ENV
from steadyvla.train.run_dir import run_dir_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
FINAL = f"{CHECKPOINTS_DIR}/step-000008"


def _values(synthetic_root: Path, tmp_path: Path, kind: str) -> dict:
    """`cuda_graphs`: one micro-batch per step, so the defaults replay each block as a CUDA graph;
    `deterministic`: the same with deterministic kernels only."""
    graphs = kind in ("cuda_graphs", "deterministic")
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="gpu", batch_size=4, grad_accumulation_steps=1 if graphs else 2, max_steps=8,
                  save_steps=2, lora_rank=8, learning_rate=0.005, lr_scheduler="cosine", lr_warmup_steps=2,
                  image_aug=True, lora_dropout=0.1, progress_bar=False, seed=5,
                  deterministic=kind == "deterministic")
    if kind == "method":
        values.update(method_enabled=True, probe_size=16, icsm_rank=8, icsm_sensitivity_samples=8,
                      thermostat_warmup_steps=2, thermostat_update_interval=2, icms_artifact_dir=str(tmp_path / "icsm"))
    return values


def _finished_run(values: dict, root: Path):
    values = {**values, "run_root_dir": str(root)}
    done = run_cli(["finetune", "--config", CONFIG, *config_args(values)])
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir_for(build_config(values)), done.stdout


def _difference(run_a: Path, run_b: Path) -> tuple[bool, float]:
    """(metrics lines and final checkpoint tensors bitwise equal, largest tensor difference)."""
    a, b = checkpoint_tensors(run_a / FINAL), checkpoint_tensors(run_b / FINAL)
    assert a.keys() == b.keys()
    bitwise = all(torch.equal(a[k], b[k]) for k in a) and metrics_lines(run_a) == metrics_lines(run_b)
    return bitwise, max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("kind", ["accumulation", "method", "cuda_graphs", "deterministic"])
def test_killed_gpu_run_resumes_and_matches_the_uninterrupted_run(synthetic_root, tmp_path, kind):
    """kill -9 inside a save, resume: the run matches the one that never stopped as closely as two
    uninterrupted runs match each other; bitwise where those are bitwise (always with
    `deterministic: true`)."""
    values = _values(synthetic_root, tmp_path, kind)
    ref_dir, _ = _finished_run(values, tmp_path / "ref")
    killed = run_cli(["finetune", "--config", CONFIG, *config_args(values)], extra_env={FAULT_ENV: "mid_save@6"})
    assert killed.returncode == -signal.SIGKILL
    run_dir, stdout = _finished_run(values, tmp_path / "runs")
    graphs = kind in ("cuda_graphs", "deterministic")
    assert ("mode reduce-overhead" in stdout) == graphs
    assert [r["step"] for r in metrics_lines(run_dir)] == list(range(1, 9))
    bitwise, diff = _difference(run_dir, ref_dir)
    if kind == "deterministic":  # deterministic kernels promise bitwise: no second run to compare with
        print(f"\nGPU resume ({kind}): resumed vs uninterrupted: bitwise {bitwise}, max difference {diff:.3e}")
        assert bitwise
        return
    repeat_bitwise, repeat_diff = _difference(_finished_run(values, tmp_path / "again")[0], ref_dir)
    print(f"\nGPU resume ({kind}): resumed vs uninterrupted: bitwise {bitwise}, max difference {diff:.3e}; "
          f"two uninterrupted runs: bitwise {repeat_bitwise}, max difference {repeat_diff:.3e}")
    if repeat_bitwise:
        assert bitwise
    else:  # nondeterministic kernels: resume may not add a difference beyond the kernels' own noise
        assert diff <= 4 * repeat_diff


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="MetaWorld is not installed")
def test_periodic_eval_on_the_fsdp_sharded_model_trains_bitwise_the_same(synthetic_root, tmp_path):
    """`steadyvla train` on one GPU under FSDP (bf16 compute, deterministic kernels): evaluating every
    2 steps (the root's parameters gathered, then sharded again) leaves the training bitwise unchanged."""
    from test_full_train import checkpoint_at, dcp_tensors

    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_id="gpu-full", use_lora=False,
                  strategy="fsdp", dtype="bfloat16", deterministic=True, batch_size=4, max_steps=4, save_steps=2,
                  learning_rate=0.001, progress_bar=False, seed=5)
    runs = {}
    for name, extra in (("off", {}), ("on", dict(enable_periodic_eval=True, eval_every_steps=2, eval_tasks="reach-v3",
                                                  eval_episodes=1, eval_max_episode_steps=3, eval_num_envs=1))):
        run_values = {**values, **extra, "run_root_dir": str(tmp_path / name)}
        done = run_cli(["train", "--config", CONFIG, *config_args(run_values)])
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        runs[name] = run_dir_for(build_config(run_values))
    rows = metrics_lines(runs["on"])
    assert [r["step"] for r in rows if "eval_success_rate" in r] == [2, 4]
    assert [{k: v for k, v in r.items() if not k.startswith("eval_")} for r in rows] == metrics_lines(runs["off"])
    on, off = dcp_tensors(checkpoint_at(runs["on"], 4)), dcp_tensors(checkpoint_at(runs["off"], 4))
    assert on.keys() == off.keys() and all(torch.equal(on[k], off[k]) for k in on)


def _checksum(pixels: torch.Tensor) -> torch.Tensor:
    """Long work on the compute stream (while the side stream copies the next batch)."""
    return (pixels.double() @ torch.ones(224, 224, device=pixels.device, dtype=torch.float64)).sum()


def test_prefetched_batches_arrive_on_the_gpu_equal_to_the_loaders_and_survive_the_next_copy():
    from steadyvla.train.prefetch import prefetched

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    source = [{"pixel_values": torch.randn(16, 6, 224, 224, generator=g).pin_memory(),
               "input_ids": torch.randint(0, 32000, (16, 40), generator=g).pin_memory(), "name": f"b{i}"}
              for i in range(5)]
    seen = []
    for batch in prefetched(iter(source), device, ("pixel_values", "input_ids")):
        assert batch["pixel_values"].device.type == "cuda" and batch["name"] == f"b{len(seen)}"
        seen.append((batch["pixel_values"].cpu(), batch["input_ids"].cpu(), _checksum(batch["pixel_values"])))
    assert len(seen) == len(source)
    for (pixels, ids, checksum), want in zip(seen, source):
        assert torch.equal(pixels, want["pixel_values"]) and torch.equal(ids, want["input_ids"])
        assert checksum.item() == _checksum(want["pixel_values"].to(device)).item()
