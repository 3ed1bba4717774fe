"""The users' own configs, keys and launcher command lines (../shared/reference/users-configs/)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers import REPO, cli_env, metrics_lines
from steadyvla.config import ConfigError, build_config, known_keys, load_config
from steadyvla.config_compat import ICSM_OPTION_ALIASES, NO_OP_KEYS, compat_notes, translate_icsm_options
from steadyvla.launch import LaunchError, build_command
from steadyvla.method.artifacts import ICSM_META
from steadyvla.method.icsm import layer_groups
from steadyvla.model.prompt import DEFAULT_PROMPT_TEMPLATE
from steadyvla.train.run_dir import run_dir_for
from synthetic import write_synthetic_dataset

USERS = REPO.parent / "shared" / "reference" / "users-configs"
pytestmark = pytest.mark.skipif(not USERS.is_dir(), reason="../shared/reference/users-configs not present")
DATASET = "libero_spatial_no_noops"  # their dataset_name, unchanged


@pytest.fixture(scope="module")
def users_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("users")
    write_synthetic_dataset(root / "data" / DATASET)
    return root


def with_local_paths(name: str, root: Path) -> Path:
    """Their YAML with only the path keys pointed at test directories (vla_path: random init, no resume dir)."""
    values = yaml.safe_load((USERS / name).read_text())
    paths = {"vla_path": None, "cache_dir": root / "hf_cache", "data_root_dir": root / "data",
             "run_root_dir": root / "runs", "adapter_tmp_dir": root / "tmp", "tmp_dir": root / "tmp",
             "artifact_dir": root / "artifacts", "probe_root_dir": root / "data", "resume_adapter_dir": None,
             "icms_artifact_dir": root / "artifacts" / "icms_openvla-7b"}
    values.update({k: None if v is None else str(v) for k, v in paths.items() if k in values})
    out = root / name
    out.write_text(yaml.safe_dump(values))
    return out


def keys_md() -> set[str]:
    return set(re.findall(r"^(\w+): ", (USERS / "KEYS.md").read_text(), flags=re.M))


def test_every_key_of_theirs_is_known_and_no_op_keys_are_theirs():
    theirs = keys_md()
    assert len(theirs) > 80
    unknown = theirs - set(known_keys()) - set(NO_OP_KEYS) - set(ICSM_OPTION_ALIASES)
    assert not unknown
    assert set(NO_OP_KEYS) <= theirs


def test_both_yamls_load_with_only_paths_changed_and_announce_what_they_ignore(users_root):
    base = load_config(with_local_paths("baseline_lora.yaml", users_root))
    method = load_config(with_local_paths("method_icsm_hsw_thermostat.yaml", users_root))
    assert (base.batch_size, base.grad_accumulation_steps, base.method_enabled) == (4, 4, False)
    assert method.hsw_layer_ids == [-2, -1] and method.prompt_template == "In: {instruction}\nOut:"
    assert method.thermostat_base_scale == 0.5 and method.early_stopping_enabled
    assert set(method.ignored_keys) == {"cache_dir", "adapter_tmp_dir", "tmp_dir", "server_profile",
                                        "rlds_frame_parallel_calls", "rlds_traj_transform_threads",
                                        "rlds_traj_read_threads", "eval_task_suite_name",
                                        "eval_num_trials_per_task", "eval_center_crop"}
    notes = compat_notes(method)
    assert len(notes) == len(method.ignored_keys) + 1  # + probe_root_dir's mapping
    assert any(n.startswith("tmp_dir: accepted and ignored") for n in notes)


def test_quantization_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match=r"`use_quantization`: true is not supported yet"):
        build_config({"use_quantization": True})
    assert not build_config({"use_quantization": False}).use_quantization


def test_negative_layer_ids_count_from_the_end():
    assert layer_groups([-2, -1], 4) == [[2], [3]]
    assert layer_groups(None, 32) == [[28, 29], [30, 31]]
    assert layer_groups([-4, -3, -2, -1], 32) == [[28, 29], [30, 31]]
    with pytest.raises(ValueError, match=r"hsw_layer_ids`: \[-5\] must be"):
        layer_groups([-5], 4)


def test_training_prompt_is_openvlas_whatever_prompt_template_says(make_config, monkeypatch):
    import steadyvla.train.finetune as finetune_module
    import steadyvla.train.setup as setup_module

    seen = []

    class Stop(Exception):
        pass

    def capture(source, prompt_builder, *args, **kwargs):
        seen.append(prompt_builder.template)
        raise Stop

    monkeypatch.setattr(setup_module, "VLADataset", capture)
    with pytest.raises(Stop):
        finetune_module.finetune(make_config(prompt_template="In: {instruction}\nOut:"), log=lambda m: None)
    assert seen == [DEFAULT_PROMPT_TEMPLATE]


def test_their_icsm_option_names_map_onto_ours():
    assert translate_icsm_options({"r": 64, "epsilon": 1e-3, "batch_size": 8, "lora_rank": 4}) == {
        "icsm_rank": 64, "icsm_epsilon_absolute": 1e-3, "icsm_batch_size": 8, "lora_rank": 4}
    with pytest.raises(ConfigError, match="`--r` and `--icsm_rank` both given"):
        translate_icsm_options({"icsm_rank": 8, "r": 4})


def launch(kind: str, argv: list[str], **env) -> list[str]:
    command, _ = build_command(kind, argv, {"CONFIG": str(REPO / "configs" / "demo.yaml"), **env})
    return command


def flag(command: list[str], key: str) -> str | None:
    """Value of the last `--key` in the command (the one the config loader keeps)."""
    values = [command[i + 1] for i, part in enumerate(command) if part == f"--{key}"]
    return values[-1] if values else None


def test_launcher_positionals_profiles_and_environment():
    cmd = launch("method", ["auto", "100", "10", "20", "3", "--lora_rank", "8"], SERVER_PROFILE="4090_1gpu",
                 GRAD_ACCUM="2", PROBE_BATCH_SIZE="6", THERMO_UPDATE="25", THERMO_WARMUP="0", RESUME_STEP="500",
                 RESUME_ADAPTER="/ckpt")
    assert cmd[1:3] == ["-m", "steadyvla.cli"]  # auto without GPUs: one process
    expected = {"max_steps": "100", "save_steps": "10", "eval_every_steps": "20", "early_stopping_patience": "3",
                "batch_size": "2", "grad_accumulation_steps": "2", "probe_batch_size": "6",
                "thermostat_update_interval": "25", "thermostat_warmup_steps": "0", "resume_global_step": "500",
                "resume_adapter_dir": "/ckpt", "enable_periodic_eval": "true", "early_stopping_enabled": "true",
                "lora_rank": "8"}
    assert {k: flag(cmd, k) for k in expected} == expected
    eight = launch("baseline", [], SERVER_PROFILE="v100_8gpu")
    assert eight[1:3] == ["-m", "torch.distributed.run"]
    assert eight[eight.index("--nproc_per_node") + 1] == "8" and eight[eight.index("--nnodes") + 1] == "1"
    assert (flag(eight, "batch_size"), flag(eight, "grad_accumulation_steps"), flag(eight, "probe_batch_size")) == \
        ("1", "8", None)
    assert flag(launch("method", ["1"]), "probe_batch_size") == "4"  # their default
    assert flag(launch("method", ["2", "--batch_size", "5"], BATCH_SIZE="3"), "batch_size") == "5"  # flags win


def test_launcher_reads_the_profile_from_the_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("server_profile: v100_8gpu\n")
    assert "--nproc_per_node" in build_command("method", [], {"CONFIG": str(config)})[0]
    config.write_text("server_profile: a100_4gpu\n")
    with pytest.raises(LaunchError, match=r"server_profile='a100_4gpu': not a known profile; valid: 4090_1gpu"):
        build_command("method", [], {"CONFIG": str(config)})


@pytest.mark.parametrize("kind,argv,env,message", [
    ("method", ["two"], {}, r"NPROC='two': expected an integer >= 1"),
    ("method", ["1", "ten"], {}, r"TARGET_STEPS='ten'"),
    ("method", ["1", "1", "1", "1", "1", "1"], {}, r"too many positional arguments"),
    ("method", [], {"SERVER_PROFILE": "laptop"}, r"SERVER_PROFILE='laptop': not a known profile"),
    ("method", [], {"GRAD_ACCUM": "0"}, r"GRAD_ACCUM='0': expected an integer >= 1"),
    ("method", [], {"RESUME_STEP": "-1"}, r"RESUME_STEP='-1'"),
    ("method", [], {"CLEAN_STALE_GPU_PROCS": "yes"}, r"CLEAN_STALE_GPU_PROCS='yes': expected 0 or 1"),
    ("baseline", [], {"THERMO_UPDATE": "10"}, r"THERMO_UPDATE='10': the baseline has no probe"),
])
def test_launcher_refuses_values_it_does_not_understand(kind, argv, env, message):
    with pytest.raises(LaunchError, match=message):
        launch(kind, argv, **env)


def script(name: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = cli_env({"STEADYVLA_BIN": str(Path(sys.executable).parent), "OMP_NUM_THREADS": "1", **env})
    return subprocess.run([str(REPO / "scripts" / name), *args], env=full_env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def test_dry_run_prints_the_command_and_errors_exit_2(tmp_path):
    ok = script("run_baseline_lora.sh", ["1", "7"], {"STEADYVLA_DRY_RUN": "1"})
    assert ok.returncode == 0, ok.stderr
    assert "steadyvla.cli finetune --config" in ok.stdout and "--max_steps 7" in ok.stdout
    bad = script("run_method_train.sh", [], {"STEADYVLA_DRY_RUN": "1", "BATCH_SIZE": "big"})
    assert bad.returncode == 2 and "error: BATCH_SIZE='big'" in bad.stderr


def test_their_baseline_yaml_runs(users_root):
    cfg = load_config(with_local_paths("baseline_lora.yaml", users_root), {"max_steps": 1, "save_steps": 1})
    from steadyvla.train.finetune import finetune

    assert finetune(cfg, log=lambda m: None).final_step == 1
    assert [r["step"] for r in metrics_lines(run_dir_for(cfg))] == [1]


@pytest.mark.slow
def test_their_method_yaml_and_launcher_command_line_run(users_root):
    config = with_local_paths("method_icsm_hsw_thermostat.yaml", users_root)
    done = script("run_method_train.sh", ["1", "2", "2"], {"CONFIG": str(config)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "server profile 4090_1gpu" in done.stdout and "tmp_dir: accepted and ignored" in done.stdout
    cfg = load_config(config, {"max_steps": 2, "save_steps": 2, "probe_batch_size": 4, "enable_periodic_eval": True})
    rows = metrics_lines(run_dir_for(cfg))
    assert [r["step"] for r in rows] == [1, 2] and all("drift_d" in r for r in rows)
    meta = json.loads((users_root / "artifacts" / "icms_openvla-7b" / ICSM_META).read_text())
    assert meta["groups"] == [[2], [3]]  # hsw_layer_ids [-2, -1] on the 4-layer tiny model
    assert meta["probe_prompt_template"] == "In: {instruction}\nOut:"


def test_offline_icms_script_takes_their_option_names(users_root):
    config = with_local_paths("method_icsm_hsw_thermostat.yaml", users_root)
    out = users_root / "artifacts" / "theirs"
    done = script("run_offline_icms.sh", ["--icms_artifact_dir", str(out), "--r", "8", "--epsilon", "1e-3",
                                          "--fragile_dim", "4", "--plastic_dim", "2", "--max_samples", "12",
                                          "--sensitivity_samples", "4", "--layer_ids=-1", "--batch_size", "4"],
                  {"CONFIG": str(config)})
    assert done.returncode == 0, done.stdout + done.stderr
    meta = json.loads((out / ICSM_META).read_text())
    assert (meta["r"], meta["epsilon_absolute"], meta["fragile_dim"], meta["plastic_dim"]) == (8, 1e-3, 4, 2)
    assert meta["probe"]["size"] == 12 and meta["groups"] == [[3]]


def test_artifacts_built_with_another_probe_prompt_are_refused(make_config, tmp_path):
    from steadyvla.data.registry import open_frame_source
    from steadyvla.method.build_icsm import build_icsm, load_probe
    from steadyvla.method.artifacts import read_artifacts
    from steadyvla.method.hook import MethodHook
    from steadyvla.model.build import build_vla, load_tokenizer, wrap_lora

    small = dict(method_enabled=True, probe_size=8, icsm_rank=4, icsm_sensitivity_samples=2,
                 icms_artifact_dir=str(tmp_path / "icsm"))
    cfg = make_config(**small)
    source = open_frame_source(Path(cfg.data_root_dir), cfg.dataset_name)
    artifacts = read_artifacts(build_icsm(cfg, source, log=lambda m: None))
    assert artifacts.meta["probe_prompt_template"] == "In: {instruction}\nOut:"
    other = make_config(**small, prompt_template="Task: {instruction}.")
    tokenizer = load_tokenizer(other)
    model = wrap_lora(build_vla(other, tokenizer), other)
    with pytest.raises(ConfigError, match=r"`prompt_template`: 'Task: \{instruction\}.', but the ICSM artifacts were "
                                          r"built with probe prompt 'In: \{instruction\}\\nOut:'"):
        MethodHook(other, model, tokenizer, artifacts, load_probe(other, source), torch.device("cpu"))
