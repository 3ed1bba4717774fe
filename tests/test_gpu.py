"""CUDA paths (pinned-memory snapshots, CUDA RNG state, method hooks on GPU). Skipped without a GPU;
run on the GPU machine: `python -m pytest -q tests/test_gpu.py -s`."""

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


@pytest.mark.parametrize("kind", ["accumulation", "method", "cuda_graphs"])
def test_killed_gpu_run_resumes_and_matches_the_uninterrupted_run(synthetic_root, tmp_path, kind):
    """kill -9 inside a save, resume: metrics lines and checkpoint tensors bitwise equal to the run
    that never stopped. `cuda_graphs`: one micro-batch per step and no LoRA dropout, so the defaults
    replay each block as a CUDA graph and fuse the LoRA layers into their base matmuls."""
    method = kind == "method"
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="gpu", batch_size=4, grad_accumulation_steps=1 if kind == "cuda_graphs" else 2, max_steps=8,
                  save_steps=2, lora_rank=8, learning_rate=0.005, lr_scheduler="cosine", lr_warmup_steps=2,
                  image_aug=True, lora_dropout=0.0 if kind == "cuda_graphs" else 0.1, progress_bar=False, seed=5)
    if method:
        values.update(method_enabled=True, probe_size=16, icsm_rank=8, icsm_sensitivity_samples=8,
                      thermostat_warmup_steps=2, thermostat_update_interval=2, icms_artifact_dir=str(tmp_path / "icsm"))
    config = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    reference = {**values, "run_root_dir": str(tmp_path / "ref")}
    ref = run_cli(["finetune", "--config", config, *config_args(reference)])
    assert ref.returncode == 0, ref.stdout + ref.stderr
    killed = run_cli(["finetune", "--config", config, *config_args(values)], extra_env={FAULT_ENV: "mid_save@6"})
    assert killed.returncode == -signal.SIGKILL
    done = run_cli(["finetune", "--config", config, *config_args(values)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("mode reduce-overhead" in done.stdout) == ("lora_fused_matmul (" in done.stdout) == (kind == "cuda_graphs")
    ref_dir, run_dir = run_dir_for(build_config(reference)), run_dir_for(build_config(values))
    got, want = metrics_lines(run_dir), metrics_lines(ref_dir)
    assert [r["step"] for r in got] == list(range(1, 9))
    a = checkpoint_tensors(run_dir / CHECKPOINTS_DIR / "step-000008")
    b = checkpoint_tensors(ref_dir / CHECKPOINTS_DIR / "step-000008")
    assert a.keys() == b.keys()
    bitwise = all(torch.equal(a[k], b[k]) for k in a) and got == want
    max_diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    print(f"\nGPU resume ({kind}): bitwise equal = {bitwise}; max tensor difference = {max_diff:.3e}; "
          f"final loss {got[-1]['train_loss']:.6f} vs {want[-1]['train_loss']:.6f}")
    assert bitwise
