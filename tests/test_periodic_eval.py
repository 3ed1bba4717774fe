"""Periodic evaluation during training: it does not disturb training (bitwise), early stopping
survives kill -9 (stops at the same step), the best checkpoint survives retention, bad input."""

from __future__ import annotations

import importlib.util
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (DEMO_CONFIG, assert_bitwise_equal, checkpoint_tensors, cli_command, cli_env, finetune_args,
                     metrics_lines, run_cli, run_dir_of)
from steadyvla.checkpoint.layout import CHECKPOINTS_DIR
from steadyvla.checkpoint.manager import CheckpointManager
from steadyvla.config import ConfigError, build_config, load_config
from steadyvla.eval.early_stopping import EarlyStopping
from steadyvla.eval.periodic import (HOOK_NAME, SCORE_KEY, _tracker_from, eval_settings, isolated_eval,
                                    periodic_eval_tasks)
from steadyvla.faults import FAULT_ENV
from steadyvla.sim.metaworld import TASK_INSTRUCTIONS
from steadyvla.train.finetune import finetune

needs_metaworld = pytest.mark.skipif(importlib.util.find_spec("metaworld") is None,
                                     reason="MetaWorld is not installed (pip install 'steadyvla[demo]')")
# cheap evaluation: 1 task, 1 episode of 1 env step, 32 px frames
EVAL = dict(enable_periodic_eval=True, eval_every_steps=2, eval_tasks="reach-v3", eval_episodes=1,
            eval_max_episode_steps=1, eval_num_envs=1)
METHOD = dict(method_enabled=True, probe_size=16, probe_batch_size=4, icsm_rank=8, icsm_sensitivity_samples=8,
              thermostat_warmup_steps=2, thermostat_update_interval=2, thermostat_k_beta=50.0,
              thermostat_k_gamma=100.0, thermostat_base_scale=0.0)


def _values(synthetic_root: Path, run_root: Path, **extra) -> dict:
    """A tiny run that draws from every RNG (augmentation, dropout) so a disturbed RNG would show."""
    values = dict(data_root_dir=str(synthetic_root), dataset_name="synth", run_root_dir=str(run_root), run_id="pe",
                  batch_size=2, grad_accumulation_steps=2, max_steps=4, save_steps=4, lora_rank=4,
                  learning_rate=0.01, image_aug=True, lora_dropout=0.1, progress_bar=False, seed=5,
                  demo_image_size=32)
    values.update(extra)
    return values


def _train(values: dict):
    """In-process, with the same configuration `finetune_args` gives the CLI (configs/demo.yaml + values)."""
    return finetune(load_config(DEMO_CONFIG, values), log=lambda _m: None)


def _without_eval_keys(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("eval_")} for row in rows]


def _ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).iterdir() if p.is_dir())


# ---------------------------------------------------------------------------- early stopping rules

def test_early_stopping_counts_evaluations_without_improvement_by_min_delta():
    tracker = EarlyStopping(patience=2, min_delta=0.1)
    assert tracker.observe(10, 0.2)  # the first evaluation is the best so far
    assert tracker.observe(20, 0.3)  # +0.1 counts although 0.3 - 0.2 < 0.1 in floating point
    assert not tracker.observe(30, 0.35) and tracker.patience_left == 1 and not tracker.should_stop
    assert not tracker.observe(40, 0.3) and tracker.should_stop
    assert (tracker.best_score, tracker.best_step) == (0.3, 20)
    again = EarlyStopping(patience=2, min_delta=0.1)
    again.load_state_dict(json.loads(json.dumps(tracker.state_dict())))
    assert again.state_dict() == tracker.state_dict() and again.should_stop
    assert not EarlyStopping(patience=1, enabled=False, evals_without_improvement=5, best_score=0.0).should_stop
    flat = EarlyStopping(patience=1)
    flat.observe(2, 0.0)
    assert not flat.observe(4, 0.0) and flat.should_stop  # a tie is no improvement


def test_retention_keeps_protected_steps_beyond_keep_last_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last_k=1, log=lambda _m: None)

    def write(step):
        return lambda d: (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))

    for step in (2, 4, 6):
        manager.save(step, write(step), keep_steps={2})
    assert _ckpt_names(tmp_path) == ["step-000002", "step-000006"]
    manager.save(8, write(8))  # protection is per save: without it the old best goes
    assert _ckpt_names(tmp_path) == ["step-000008"]


def test_isolated_eval_restores_every_rng_and_module_mode_and_seeds_its_own():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    model.train()
    model[0].eval()  # a module the trainer keeps in eval mode stays so
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    draws = []
    for _ in range(2):
        with isolated_eval(model, rank=0, seed=9):
            assert not model.training and not torch.is_grad_enabled()
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]  # the eval's own seed, whatever the training RNG was
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    assert model.training and model[1].training and not model[0].training


def test_changed_eval_settings_start_the_best_score_over():
    cfg = build_config({**EVAL, "early_stopping_enabled": True, "early_stopping_patience": 1})
    old = EarlyStopping(patience=1)
    old.observe(2, 0.5), old.observe(4, 0.0)
    meta = {"settings": eval_settings(cfg, ["reach-v3"]), "tracker": old.state_dict()}
    assert _tracker_from(cfg, ["reach-v3"], meta).should_stop
    notes = []
    fresh = _tracker_from(build_config({**EVAL, "eval_episodes": 5}), ["reach-v3"], meta, notes.append)
    assert fresh.best_score is None and not fresh.should_stop and "start over" in notes[0]


# ------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("change, words", [
    ({"eval_tasks": "reach-v3,fly-v3"}, ["eval_tasks", "fly-v3", "reach-v3"]),
    ({"eval_tasks": "reach-v3,reach-v3"}, ["eval_tasks", "repeated"]),
    ({"eval_every_steps": 0}, ["eval_every_steps", "0", ">= 1"]),
    ({"eval_episodes": 0}, ["eval_episodes", ">= 1"]),
    ({"eval_max_episode_steps": 501}, ["eval_max_episode_steps", "501", "[1, 500]"]),
    ({"early_stopping_patience": 0}, ["early_stopping_patience", ">= 1"]),
    ({"early_stopping_min_delta": -0.1}, ["early_stopping_min_delta", ">= 0"]),
])
def test_bad_eval_settings_are_config_errors_naming_the_field(change, words):
    with pytest.raises(ConfigError) as err:
        build_config({**EVAL, **change})
    for word in words:
        assert word in str(err.value)


class _Source:
    def __init__(self, instructions):
        self.instructions = instructions


def test_eval_tasks_default_to_the_metaworld_tasks_of_the_training_data():
    notes = []
    cfg = build_config({"enable_periodic_eval": True, "dataset_name": "libero_spatial_no_noops"})
    demo = _Source([TASK_INSTRUCTIONS["push-v3"], TASK_INSTRUCTIONS["reach-v3"], "something else"])
    assert periodic_eval_tasks(cfg, demo, 4, notes.append) == ["reach-v3", "push-v3"]
    assert periodic_eval_tasks(cfg, _Source(["put the bowl on the plate"]), 7, notes.append) is None
    assert "libero_spatial_no_noops" in notes[0] and "MetaWorld v3" in notes[0] and "off" in notes[0]
    assert periodic_eval_tasks(build_config({}), demo, 4, notes.append) is None  # not enabled
    with pytest.raises(ConfigError, match="enable_periodic_eval.*7-dimensional"):
        periodic_eval_tasks(build_config({**EVAL}), demo, 7, notes.append)


# ------------------------------------------------------------------------------------ end to end

@needs_metaworld
def test_eval_on_trains_bitwise_the_same_as_off_with_the_method_and_writes_results(synthetic_root, tmp_path):
    common = dict(keep_last_k=1, icms_artifact_dir=str(tmp_path / "icsm"), **METHOD)
    off = _values(synthetic_root, tmp_path / "off", **common)
    on = _values(synthetic_root, tmp_path / "on", **common, **EVAL)
    assert _train(off).final_step == 4 and _train(on).final_step == 4
    off_dir, on_dir = run_dir_of(off), run_dir_of(on)
    assert_bitwise_equal(checkpoint_tensors(on_dir / CHECKPOINTS_DIR / "step-000004"),
                         checkpoint_tensors(off_dir / CHECKPOINTS_DIR / "step-000004"))  # adapter, AdamW, RNG
    on_rows = metrics_lines(on_dir)
    assert _without_eval_keys(on_rows) == metrics_lines(off_dir)  # loss, lr, drift, beta/gamma: all equal
    assert [r["step"] for r in on_rows if SCORE_KEY in r] == [2, 4]
    assert all(f"{SCORE_KEY}/reach-v3" in r and "hsw_beta" in r for r in on_rows if SCORE_KEY in r)
    for step in (2, 4):
        report = json.loads((on_dir / "eval" / f"step-{step:06d}.json").read_text())
        assert report["global_step"] == step and report["tasks"]["reach-v3"]["episodes"] == 1
        assert report["during_training"] and report["max_steps"] == 1 and report["image_size"] == 32
    # both hooks' states in the checkpoint, by name; the best (step 2: a later tie is no improvement) is
    # kept although keep_last_k is 1 and save_steps 4 (every eval step saves)
    state = json.loads((on_dir / CHECKPOINTS_DIR / "step-000004" / "trainer_state.json").read_text())
    assert set(state["method"]) == {"method", HOOK_NAME}
    assert state["method"][HOOK_NAME]["tracker"]["best_step"] == 2
    assert _ckpt_names(on_dir) == ["step-000002", "step-000004"]
    # a resumed run knows the best too: its saves keep step 2 while keep_last_k=1 drops the others
    assert _train({**on, "max_steps": 6}).final_step == 6
    assert _ckpt_names(on_dir) == ["step-000002", "step-000006"]


@needs_metaworld
def test_killed_run_with_early_stopping_stops_at_the_same_step_as_uninterrupted(synthetic_root, tmp_path, capsys):
    stopping = dict(EVAL, early_stopping_enabled=True, early_stopping_patience=1, max_steps=8)
    reference = _values(synthetic_root, tmp_path / "ref", **stopping)
    result = _train(reference)
    assert result.stopped_early and result.final_step == 4  # evals at 2 (best) and 4 (no improvement)
    values = _values(synthetic_root, tmp_path / "run", **stopping)
    # killed after the eval of step 4, before its checkpoint: the resume starts from step 2, whose
    # early-stopping state must come back (a fresh one would take step 4 as the best and go on)
    killed = run_cli(finetune_args(values), extra_env={FAULT_ENV: "after_eval@4"})
    assert killed.returncode == -signal.SIGKILL
    run_dir = run_dir_of(values)
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == "step-000002"
    done = run_cli(finetune_args(values))
    assert done.returncode == 0, done.stdout + done.stderr
    ckpt = run_dir / CHECKPOINTS_DIR / "step-000002"
    assert (f"early stopping at step 4: {SCORE_KEY} has not improved by >= 0.0 for 1 evaluation(s) "
            f"(early_stopping_patience 1); best {SCORE_KEY} 0.000 at step 2, checkpoint {ckpt}") in done.stdout
    ref_dir = run_dir_of(reference)
    assert metrics_lines(run_dir) == metrics_lines(ref_dir)  # training and eval keys, line by line
    assert_bitwise_equal(checkpoint_tensors(run_dir / CHECKPOINTS_DIR / "step-000004"),
                         checkpoint_tensors(ref_dir / CHECKPOINTS_DIR / "step-000004"))
    assert (run_dir / CHECKPOINTS_DIR / "latest").read_text().strip() == "step-000004"
    # once stopped, the same command does nothing (exit 0) and says so
    from steadyvla.cli import main

    assert main(finetune_args(values)) == 0
    assert "run already stopped early at step 4" in capsys.readouterr().out
    assert [r["step"] for r in metrics_lines(run_dir)] == [1, 2, 3, 4]


@needs_metaworld
def test_two_ranks_evaluate_on_rank_0_and_stop_together(synthetic_root, tmp_path):
    values = _values(synthetic_root, tmp_path, **EVAL, early_stopping_enabled=True, early_stopping_patience=1,
                     max_steps=8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *cli_command(finetune_args(values))[1:]]
    done = subprocess.run(cmd, env=cli_env({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("early stopping at step 4") == 1  # rank 0 speaks; rank 1 stopped with it
    run_dir = run_dir_of(values)
    rows = metrics_lines(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if SCORE_KEY in r] == [2, 4]
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == ["step-000002.json", "step-000004.json"]
    state = json.loads((run_dir / CHECKPOINTS_DIR / "step-000004" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["method"][HOOK_NAME]["tracker"]["evals_without_improvement"] == 1


def test_waiting_ranks_follow_rank_0_queries_and_get_its_results_and_its_failure(tmp_path):
    import torch.multiprocessing as mp

    from periodic_workers import broadcast_worker

    mp.spawn(broadcast_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["got"] == ranks[1]["got"] == {"score": 0.5}
    assert ranks[0]["followed"] == [] and ranks[1]["followed"] == [{"images": [i, i + 1]} for i in range(3)]
    assert ranks[0]["error"] == "renderer gone"
    assert "periodic evaluation failed on rank 0 (ValueError: renderer gone)" in ranks[1]["error"]
