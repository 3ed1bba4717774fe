"""Data-parallel LoRA fine-tuning under torchrun with 2 gloo processes on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

from helpers import assert_bitwise_equal, checkpoint_tensors, cli_env, config_args, metrics_lines
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR, STARTS_JSONL
from steadyvla.config import build_config
from steadyvla.faults import FAULT_ENV
from steadyvla.train.run_dir import run_dir_for

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def torchrun(nproc: int, values: dict, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "steadyvla.cli", "finetune", "--config", CONFIG, *config_args(values)]
    env = cli_env({"OMP_NUM_THREADS": "1", **(extra_env or {})})
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_two_rank_run_killed_mid_save_resumes_bit_exact_and_can_shrink_to_one_rank(synthetic_root, tmp_path):
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(tmp_path / "runs"),
                  run_id="ddp", batch_size=2, grad_accumulation_steps=2, max_steps=6, save_steps=2, lora_rank=4,
                  learning_rate=0.005, lr_scheduler="cosine", lr_warmup_steps=2, image_aug=True, lora_dropout=0.1,
                  progress_bar=False, seed=5)
    reference = {**values, "run_root_dir": str(tmp_path / "ref")}
    ref = torchrun(2, reference)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    ref_dir = run_dir_for(build_config(reference))
    ref_rows = metrics_lines(ref_dir)
    assert [r["step"] for r in ref_rows] == list(range(1, 7))
    ref_state = json.loads((ref_dir / CHECKPOINTS_DIR / "step-000006" / "trainer_state.json").read_text())
    assert ref_state["world_size"] == 2 and set(ref_state["rng"]) == {"rank0", "rank1"}

    killed = torchrun(2, values, {FAULT_ENV: "mid_save@4"})
    assert killed.returncode != 0
    run_dir = run_dir_for(build_config(values))
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == "step-000002"
    done = torchrun(2, values)
    assert done.returncode == 0, done.stdout + done.stderr
    assert metrics_lines(run_dir) == ref_rows
    assert_bitwise_equal(checkpoint_tensors(run_dir / CHECKPOINTS_DIR / "step-000006"),
                         checkpoint_tensors(ref_dir / CHECKPOINTS_DIR / "step-000006"))

    # the same run continues on one process: global sample order kept, change recorded
    one = subprocess.run([sys.executable, "-m", "steadyvla.cli", "finetune", "--config", CONFIG,
                          *config_args({**values, "max_steps": 8})], env=cli_env(), capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    assert "world size 2 -> 1" in one.stdout
    assert [r["step"] for r in metrics_lines(run_dir)] == list(range(1, 9))
    last_start = json.loads((run_dir / STARTS_JSONL).read_text().splitlines()[-1])
    assert last_start["changed_fields"]["world_size"] == {"checkpoint": 2, "now": 1}


def test_ranks_agree_on_flags_on_a_gloo_group_of_their_own(tmp_path):
    """The per-step preemption flag and the saves' outcomes are agreed on the host (a gloo group):
    under NCCL, a flag read back from a GPU tensor would wait for every queued kernel each step."""
    import torch.multiprocessing as mp

    from dist_workers import agreement_worker

    mp.spawn(agreement_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got == {"any": [True, False], "all": [False, True], "own_group": True, "one_group": True}, (rank, got)
