"""The run directory: its stable id, config.yaml of the first start, starts.jsonl of every start."""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from steadyvla.atomic_files import atomic_write_text, mkdir_durable
from steadyvla.checkpoint.layout import CONFIG_YAML, ERROR_LOG, STARTS_JSONL
from steadyvla.config import RunConfig, dump_config
from steadyvla.supervise import RESTART_ENV
from steadyvla.versions import library_versions


def derive_run_id(cfg: RunConfig) -> str:
    """OpenVLA-style experiment id from the settings that define the run (stable across restarts,
    so re-running the same command continues the same run)."""
    if cfg.run_id:
        return cfg.run_id
    parts = [cfg.model_preset if not cfg.vla_path else Path(cfg.vla_path).name, cfg.dataset_name,
             f"b{cfg.batch_size * cfg.grad_accumulation_steps}", f"lr-{cfg.learning_rate:g}"]
    if cfg.use_lora:
        parts += [f"lora-r{cfg.lora_rank}", f"dropout-{cfg.lora_dropout:g}"]
    run_id = "+".join(parts)
    if cfg.image_aug:
        run_id += "--image_aug"
    if cfg.method_enabled:
        run_id += "--method"
    if cfg.run_id_note:
        run_id += f"--{cfg.run_id_note}"
    return run_id


def run_dir_for(cfg: RunConfig) -> Path:
    return Path(cfg.run_root_dir) / derive_run_id(cfg)


def record_start(run_dir: Path, cfg: RunConfig, *, resumed_from: str | None, resumed_step: int,
                 changes: dict[str, Any], rewind: dict[str, str] | None = None) -> None:
    """Write config.yaml on the first start; append this start to starts.jsonl."""
    mkdir_durable(run_dir)  # fsyncs run_root_dir: the new run dir's entry survives a crash
    if not (run_dir / CONFIG_YAML).exists():
        atomic_write_text(run_dir / CONFIG_YAML, dump_config(cfg))
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "resumed_from": resumed_from,
        "resumed_step": resumed_step,
        "changed_fields": changes,
        "rewind": rewind,  # {"from": the abandoned latest, "to": the checkpoint it went back to}
        # {"attempt", "of", "after"} when a launcher restarted the run (restart_on_failure)
        "restart": json.loads(os.environ[RESTART_ENV]) if os.environ.get(RESTART_ENV) else None,
        "versions": library_versions(),
    }
    with (run_dir / STARTS_JSONL).open("a") as f:
        f.write(json.dumps(entry) + "\n")


def record_error(run_dir: Path, err: BaseException) -> Path | None:
    """Append `err`'s full traceback to the run dir's errors.log (if the run dir exists); return its path.

    The command line then shows one `error:` line naming this file instead of the traceback."""
    if not run_dir.is_dir():
        return None
    path = run_dir / ERROR_LOG
    with path.open("a") as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(sys.argv)}\n")
        f.write("".join(traceback.format_exception(err)))
    return path
