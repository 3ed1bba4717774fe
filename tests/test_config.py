import os

import pytest
import torch

from steadyvla.cli import main
from steadyvla.config import ConfigError, build_config, load_config, parse_overrides


def test_overrides_are_read_as_yaml_scalars():
    assert parse_overrides(["--hsw-layer-ids=-2,-1"]) == {"hsw_layer_ids": "-2,-1"}
    values = parse_overrides(["--max_steps", "20", "--image_aug", "true", "--resume_global_step", "null",
                              "--learning_rate", "3e-4", "--run_id_note=exp1"])
    cfg = build_config(values)
    assert (cfg.max_steps, cfg.image_aug, cfg.resume_global_step, cfg.learning_rate) == (20, True, None, 3e-4)
    assert cfg.run_id_note == "exp1"


def test_unknown_key_names_the_closest_known_key():
    with pytest.raises(ConfigError, match=r"unknown config key `learning_rat`; did you mean `learning_rate`"):
        build_config({"learning_rat": 1e-4})


@pytest.mark.parametrize("key,value,message", [
    ("batch_size", "eight", r"`batch_size`: 'eight' is not an integer"),
    ("batch_size", 0, r"`batch_size`: 0 must be >= 1"),
    ("lr_scheduler", "linear", r"`lr_scheduler`: 'linear' is not one of none, cosine"),
    ("image_aug", "yes please", r"`image_aug`: 'yes please' is not a boolean"),
    ("lora_dropout", 1.5, r"`lora_dropout`: 1.5 must be in \[0, 1\)"),
    ("max_steps", None, r"`max_steps`: null is not allowed"),
    ("hsw_layer_ids", "last,two", r"`hsw_layer_ids`: 'last,two' is not a list of integers"),
    ("icsm_split", "middle", r"`icsm_split`: 'middle' is not one of ranked, extremes"),
])
def test_bad_values_name_the_field(key, value, message):
    with pytest.raises(ConfigError, match=message):
        build_config({key: value})


def test_resume_global_step_null_is_accepted():
    assert build_config({"resume_global_step": None}).resume_global_step is None
    assert build_config({"resume_global_step": 0}).resume_global_step == 0


def test_old_environment_keys_are_accepted_as_no_ops():
    cfg = build_config({"server_profile": "a100", "rlds_traj_read_threads": 8, "cache_dir": "/x"})
    assert cfg.ignored_keys == {"server_profile": "a100", "rlds_traj_read_threads": 8, "cache_dir": "/x"}


def test_shipped_configs_load():
    for name in ("demo", "baseline_lora"):
        load_config(f"configs/{name}.yaml")


def test_cli_reports_config_errors_with_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("batch_sise: 4\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    assert "did you mean `batch_size`" in capsys.readouterr().err


def test_digest_ignores_harmless_fields():
    a, b = build_config({"max_steps": 10}), build_config({"max_steps": 99, "save_steps": 7})
    assert a.digest() == b.digest()
    assert a.digest() != build_config({"lora_rank": 8}).digest()


def test_accepted_but_inactive_settings_are_announced():
    from steadyvla.train.finetune import unavailable_settings

    notes = unavailable_settings(build_config({"merge_lora_during_training": True, "early_stopping_enabled": True}))
    assert any("merge_lora_during_training: true is ignored" in n for n in notes)
    assert any("early_stopping_enabled: true has no effect without enable_periodic_eval" in n for n in notes)
    assert unavailable_settings(build_config({})) == []
    assert unavailable_settings(build_config({"enable_periodic_eval": True, "early_stopping_enabled": True})) == []


def test_yaml_that_does_not_parse_is_one_error_line(tmp_path, capsys):
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("batch_size: 4\nlora_rank: [8\nseed: 1\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML at line \d+, column \d+"):
        load_config(cfg)
    assert main(["finetune", "--config", str(cfg), "--run_root_dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --config") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


def test_deterministic_switches_torch_to_deterministic_kernels(monkeypatch):
    from steadyvla.train.setup import CUBLAS_DETERMINISTIC_WORKSPACE, use_deterministic_kernels

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    use_deterministic_kernels(build_config({}))
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        use_deterministic_kernels(build_config({"deterministic": True}))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_DETERMINISTIC_WORKSPACE
    finally:
        torch.use_deterministic_algorithms(False)
