"""Resumes that would silently give a different run are refused; harmless changes are accepted
(issue 8, items 8-14): dataset fingerprint, critical fields by resolved value, resume_step_override,
a new max_steps under cosine, unreadable inputs."""

import json
import shutil
from pathlib import Path

import pytest

from helpers import config_args, metrics_lines, tree_digest
from steadyvla.checkpoint.layout import DATASET_STATISTICS, STARTS_JSONL
from steadyvla.cli import main
from steadyvla.config import ConfigError, build_config
from steadyvla.train.finetune import SCHEDULE_REBUILT_RECORD, finetune
from steadyvla.train.optim import lr_multiplier
from steadyvla.train.resume import STEP_OVERRIDE_RECORD, ResumePlan, config_changes
from steadyvla.train.run_dir import run_dir_for
from synthetic import write_synthetic_dataset

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")


def _values(data_root: Path, run_root: Path, **extra) -> dict:
    values = dict(data_root_dir=str(data_root), dataset_name="synth", run_root_dir=str(run_root), run_id="r",
                  batch_size=2, max_steps=2, save_steps=2, lora_rank=4, learning_rate=0.003, lr_scheduler="cosine",
                  lr_warmup_steps=1, min_learning_rate=0.0003, progress_bar=False, seed=5)
    values.update(extra)
    return values


def _start(values: dict) -> int:
    """A start through the CLI, in-process (quick; user errors return 2 before any work)."""
    return main(["finetune", "--config", CONFIG, *config_args(values)])


def _starts(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / STARTS_JSONL).read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(synthetic_root, tmp_path_factory):
    """A finished 2-step run; tests copy it before resuming it."""
    root = tmp_path_factory.mktemp("trained")
    values = _values(synthetic_root, root / "runs")
    finetune(build_config(values), log=lambda m: None)
    return values


def _copy_run(trained: dict, tmp_path: Path, **extra) -> dict:
    shutil.copytree(trained["run_root_dir"], tmp_path / "runs")
    return {**trained, "run_root_dir": str(tmp_path / "runs"), **extra}


def _assert_refused(values: dict, capsys, *expected: str) -> None:
    run_dir = run_dir_for(build_config(values))
    before = tree_digest(run_dir)
    assert _start(values) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err, (text, err)
    assert tree_digest(run_dir) == before


# ---- item 8: dataset fingerprint, not path

def test_moved_dataset_resumes_and_changed_dataset_is_refused(tmp_path, capsys):
    write_synthetic_dataset(tmp_path / "node_a" / "synth")
    values = _values(tmp_path / "node_a", tmp_path / "runs")
    finetune(build_config(values), log=lambda m: None)
    # staged elsewhere with new mtimes (copy, not copy2): identical contents resume
    shutil.copytree(tmp_path / "node_a", tmp_path / "node_b", copy_function=shutil.copy)
    shutil.rmtree(tmp_path / "node_a")
    moved = {**values, "data_root_dir": str(tmp_path / "node_b"), "max_steps": 4}
    assert finetune(build_config(moved), log=lambda m: None).final_step == 4
    # regenerated in place with more episodes: 72 -> 108 frames
    shutil.rmtree(tmp_path / "node_b" / "synth")
    write_synthetic_dataset(tmp_path / "node_b" / "synth", episodes_per_task=3)
    _assert_refused({**moved, "max_steps": 6}, capsys, "dataset", "node_b/synth", "frames: checkpoint 72, now 108",
                    "episodes: checkpoint 6, now 9", "data_root_dir", "new run")


# ---- item 10: critical fields compared by resolved value, only where the run uses them

def _plan(stored: dict) -> ResumePlan:
    cfg = build_config(stored)
    return ResumePlan(Path("ckpt"), {"global_step": 2, "config": cfg.to_dict()})


@pytest.mark.parametrize("key,new", [("dtype", "bfloat16"), ("max_grad_norm", 0.5), ("image_key", "wrist")])
def test_fields_that_change_the_run_are_refused(key, new):
    with pytest.raises(ConfigError, match=f"`{key}`: checkpoint .*, now {new!r}"):
        config_changes(build_config({key: new}), _plan({}))


def test_equal_resolved_values_and_unused_method_keys_are_accepted():
    changes = config_changes(build_config({"lora_rank": 4, "lora_alpha": 4}), _plan({"lora_rank": 4}))
    assert changes == {"lora_alpha": {"checkpoint": None, "now": 4}}  # recorded, not refused
    with pytest.raises(ConfigError, match="`lora_alpha`: checkpoint 4, now 8"):
        config_changes(build_config({"lora_rank": 4, "lora_alpha": 8}), _plan({"lora_rank": 4}))
    baseline = build_config({"hsw_beta": 0.5, "thermostat_k_beta": 3.0, "icsm_epsilon": 0.1})
    assert set(config_changes(baseline, _plan({}))) == {"hsw_beta", "thermostat_k_beta", "icsm_epsilon"}
    with pytest.raises(ConfigError, match="`hsw_beta`: checkpoint 1.0, now 0.5"):
        config_changes(build_config({"method_enabled": True, "hsw_beta": 0.5}), _plan({"method_enabled": True}))
    # min_learning_rate means nothing without cosine
    assert config_changes(build_config({"min_learning_rate": 1e-4}), _plan({})) == {
        "min_learning_rate": {"checkpoint": 0.0, "now": 1e-4}}


def test_critical_change_through_the_cli_is_refused_and_touches_nothing(trained, tmp_path, capsys):
    values = _copy_run(trained, tmp_path, max_steps=4)
    _assert_refused({**values, "max_grad_norm": 0.5}, capsys, "`max_grad_norm`: checkpoint 1.0, now 0.5",
                    "start a new run")
    assert _start({**values, "lora_alpha": 4}) == 0  # null resolved to min(4, 16) = 4 when it was trained


# ---- item 11: resume_step_override accepts a mismatched resume_global_step, never forces it

def test_resume_step_override_continues_from_the_stored_step_and_says_so(trained, tmp_path, capsys):
    values = _copy_run(trained, tmp_path, max_steps=4, resume_global_step=5)
    _assert_refused(values, capsys, "`resume_global_step`: 5", "step 2", "--resume_step_override true",
                    "the run still continues from step 2")
    assert _start({**values, "resume_step_override": True}) == 0
    assert "resume_global_step 5 ignored (resume_step_override: true)" in capsys.readouterr().out
    run_dir = run_dir_for(build_config(values))
    assert [r["step"] for r in metrics_lines(run_dir)] == [1, 2, 3, 4]
    assert _starts(run_dir)[-1]["changed_fields"][STEP_OVERRIDE_RECORD] == {"requested": 5, "continued_at": 2}


# ---- item 12: a new max_steps under cosine applies from the first resumed step

def test_new_max_steps_rebuilds_the_cosine_schedule_before_the_first_resumed_step(trained, tmp_path):
    values = _copy_run(trained, tmp_path, max_steps=5)
    assert _start(values) == 0
    cfg = build_config(values)
    rows = metrics_lines(run_dir_for(cfg))
    fresh = [cfg.learning_rate * lr_multiplier(step - 1, cfg) for step in (3, 4, 5)]
    assert [r["lr"] for r in rows[2:]] == fresh
    record = _starts(run_dir_for(cfg))[-1]["changed_fields"][SCHEDULE_REBUILT_RECORD]
    assert record["max_steps"] == {"checkpoint": 2, "now": 5} and record["next_lr"]["now"] == fresh[0]


# ---- item 13: unreadable inputs are one error line before anything is written

def test_corrupt_dataset_statistics_is_an_error_before_the_start_is_recorded(trained, tmp_path, capsys):
    values = _copy_run(trained, tmp_path, max_steps=4)
    stats = run_dir_for(build_config(values)) / DATASET_STATISTICS
    stats.write_text('{"synth": {"action": ')
    _assert_refused(values, capsys, str(stats), "not valid JSON", "delete it")
