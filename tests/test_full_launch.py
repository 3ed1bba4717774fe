"""scripts/run_full_train.sh / `steadyvla launch full`: the command it builds, and configs/full_train.yaml."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, cli_env
from steadyvla.config import known_keys
from steadyvla.launch import LaunchError, build_command, resume_command

FULL_YAML = REPO / "configs" / "full_train.yaml"


def flag(command: list[str], key: str) -> str | None:
    values = [command[i + 1] for i, part in enumerate(command) if part == f"--{key}"]
    return values[-1] if values else None


def test_full_kind_runs_steadyvla_train_with_its_resume_keys():
    cmd, _ = build_command("full", ["1", "40", "10", "--dtype", "bfloat16"],
                           {"BATCH_SIZE": "2", "RESUME_STEP": "20", "RESUME_EPOCH": "0",
                            "PRETRAINED_CHECKPOINT": "/runs/x"})
    assert cmd[1:6] == ["-m", "steadyvla.cli", "train", "--config", str(REPO / "configs" / "full_train.yaml")]
    expected = {"max_steps": "40", "save_steps": "10", "batch_size": "2", "resume_step": "20", "resume_epoch": "0",
                "pretrained_checkpoint": "/runs/x", "dtype": "bfloat16"}
    assert {k: flag(cmd, k) for k in expected} == expected
    assert flag(cmd, "enable_periodic_eval") is None and flag(cmd, "resume_global_step") is None
    two, _ = build_command("full", ["2"], {})
    assert two[1:3] == ["-m", "torch.distributed.run"] and two[two.index("--nproc_per_node") + 1] == "2"
    assert two[two.index("steadyvla.cli") + 1] == "train"
    assert resume_command("full", ["2"], {"RESUME_STEP": "20"}) == "RESUME_STEP=20 scripts/run_full_train.sh 2"


@pytest.mark.parametrize("argv,env,message", [
    (["1", "10", "5", "3"], {}, r"too many positional arguments .* \[NPROC\|auto\] \[TARGET_STEPS\] \[SAVE_STEPS\] "
                                r"\[--key value"),
    ([], {"RESUME_ADAPTER": "/a"}, r"RESUME_ADAPTER='/a': not used by the full launcher; use PRETRAINED_CHECKPOINT"),
    ([], {"THERMO_UPDATE": "5"}, r"THERMO_UPDATE='5': the full-training launcher takes the method's keys from the YAML"),
    ([], {"RESUME_EPOCH": "-1"}, r"RESUME_EPOCH='-1': expected an integer >= 0"),
])
def test_full_kind_refuses_what_it_does_not_use(argv, env, message):
    with pytest.raises(LaunchError, match=message):
        build_command("full", argv, env)


def test_lora_kinds_refuse_the_full_training_variables():
    with pytest.raises(LaunchError, match=r"PRETRAINED_CHECKPOINT='/c': not used by the baseline launcher; use "
                                          r"RESUME_ADAPTER"):
        build_command("baseline", [], {"PRETRAINED_CHECKPOINT": "/c"})


def test_run_full_train_sh_dry_run():
    env = cli_env({"STEADYVLA_BIN": str(Path(sys.executable).parent), "STEADYVLA_DRY_RUN": "1"})
    done = subprocess.run([str(REPO / "scripts" / "run_full_train.sh"), "2", "7"], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "torch.distributed.run --standalone --nnodes 1 --nproc_per_node 2 -m steadyvla.cli train --config" \
        in done.stdout and "--max_steps 7" in done.stdout


def test_full_train_yaml_is_the_cpu_demo_with_a_comment_on_every_key():
    values = yaml.safe_load(FULL_YAML.read_text())
    assert values["use_lora"] is False and values["strategy"] == "fsdp"
    assert values["model_preset"] == "tiny" and values["dataset_name"] == "metaworld_demo"
    assert values["dtype"] == "float32"  # runs on a CPU as shipped
    key_lines = [line for line in FULL_YAML.read_text().splitlines() if line and not line.startswith("#")]
    assert len(key_lines) == len(values) and all(" # " in line for line in key_lines)


def test_full_train_yaml_uses_only_known_keys():
    train_keys = {"strategy", "reshard_after_forward", "hsdp_replicate_degree", "reduce_dtype",
                  "train_vision_backbone", "train_projector", "train_llm"}
    if not train_keys <= set(known_keys()):
        pytest.skip("the full-training config keys arrive with `steadyvla train` (issue 11, other branch)")
    from steadyvla.config import load_config

    cfg = load_config(FULL_YAML)
    assert cfg.use_lora is False
