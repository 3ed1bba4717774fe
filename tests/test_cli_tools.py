"""doctor, ckpt ls/verify and data inspect/stats from the command line (in-process)."""

import json

import yaml

from steadyvla.checkpoint.layout import CHECKPOINTS_DIR
from steadyvla.cli import main
from steadyvla.train.finetune import finetune
from steadyvla.train.run_dir import run_dir_for


def _write_config(path, cfg):
    keys = ("data_root_dir", "dataset_name", "run_root_dir", "batch_size", "max_steps", "save_steps", "lora_rank",
            "learning_rate", "seed", "progress_bar")
    path.write_text(yaml.safe_dump({k: getattr(cfg, k) for k in keys}))
    return str(path)


def test_doctor_reports_resume_target_alignment_and_config(make_config, tmp_path, capsys):
    cfg = make_config(max_steps=4, save_steps=2)
    config = _write_config(tmp_path / "c.yaml", cfg)
    assert main(["doctor", "--config", config]) == 0
    assert "nothing to resume" in capsys.readouterr().out
    finetune(cfg, log=lambda m: None)
    assert main(["doctor", "--config", config, "--max_steps", "10"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint verified" in out and "step 4" in out
    assert "is a multiple of save_steps=2" in out
    assert "`max_steps`: 4 -> 10" in out
    assert "dataset matches the checkpoint's fingerprint" in out
    assert "log at step 4: lr" in out and "a start now would continue at step 5 of 10" in out
    assert main(["doctor", "--config", config, "--seed", "99"]) == 1  # same run dir, different run
    assert "`seed`: checkpoint 3, now 99" in capsys.readouterr().out


def test_ckpt_ls_and_verify(make_config, capsys):
    cfg = make_config(max_steps=4, save_steps=2)
    finetune(cfg, log=lambda m: None)
    run_dir = run_dir_for(cfg)
    assert main(["ckpt", "ls", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "step-000002" in out and "step-000004" in out and "latest" in out
    assert main(["ckpt", "verify", str(run_dir)]) == 0
    victim = run_dir / CHECKPOINTS_DIR / "step-000004" / "trainer_state.json"
    victim.write_text(victim.read_text().replace('"global_step": 4', '"global_step": 5'))
    assert main(["ckpt", "verify", str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert "trainer_state.json: sha256" in out and "step-000002" in out.splitlines()[-1]
    assert main(["ckpt", "ls", str(run_dir / "nope")]) == 2


def test_data_inspect_and_stats(synthetic_root, tmp_path, capsys):
    assert main(["data", "inspect", str(synthetic_root / "synth")]) == 0
    out = capsys.readouterr().out
    assert "episodes: 6  frames: 72" in out and "push the red block" in out
    out_file = tmp_path / "dataset_statistics.json"
    assert main(["data", "stats", str(synthetic_root / "synth"), "--out", str(out_file)]) == 0
    stats = json.loads(out_file.read_text())
    assert stats["synth"]["num_transitions"] == 72 and stats["synth"]["num_trajectories"] == 6
    assert stats["synth"]["action"]["mask"] == [True, True, True, False]
