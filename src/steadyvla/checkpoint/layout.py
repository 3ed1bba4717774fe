"""Every file and directory name of a run dir and its checkpoints, in one place.

A run dir looks like::

    <run_dir>/
      config.yaml  starts.jsonl  metrics.jsonl  dataset_statistics.json  tb/  run.lock  errors.log
      checkpoints/
        step-000250/                         LoRA run
        step-000250-epoch-00-loss=2.3456/    full run (model_optim/ = DCP shards of every rank)
        latest                               name of the newest complete checkpoint

The step in a directory name is only a hint for listing and sorting; the authoritative step is
``global_step`` in the checkpoint's ``trainer_state.json``.
"""

from __future__ import annotations

import math
import re

# Run dir
CONFIG_YAML = "config.yaml"
STARTS_JSONL = "starts.jsonl"
METRICS_JSONL = "metrics.jsonl"
DATASET_STATISTICS = "dataset_statistics.json"
TENSORBOARD_DIR = "tb"
CHECKPOINTS_DIR = "checkpoints"
RUN_LOCK_FILE = "run.lock"  # flock'ed by the process that trains into the run dir (run_lock.py)
ERROR_LOG = "errors.log"  # full tracebacks of runs that ended with an `error:` line

# checkpoints/
LATEST_FILE = "latest"

# One checkpoint dir
MANIFEST_FILE = "manifest.json"
TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_TENSORS = "trainer_state.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DCP_DIR = "model_optim"  # full runs: torch.distributed.checkpoint dir of {"model": ..., "optim": ...}
DCP_MODEL_KEY = "model"
DCP_OPTIM_KEY = "optim"

# Hidden siblings inside checkpoints/ that only exist while a save or a deletion is under way.
# A run killed at the wrong moment leaves them behind; the next save cleans them up.
TMP_DIR_PREFIX = ".tmp-"  # .tmp-<name>-<pid>: a checkpoint being written
ASIDE_DIR_PREFIX = ".old-"  # .old-<name>-<pid>: an earlier dir of the same name, being replaced
TRASH_DIR_PREFIX = ".trash-"  # .trash-<name>-<pid>: a checkpoint being deleted by retention

STEP_PREFIX = "step-"
_STEP_RE = re.compile(r"^step-(\d+)(?:-|$)")


def step_dir_name(step: int, epoch: int | None = None, loss: float | None = None) -> str:
    """Name of the checkpoint dir for ``step``.

    ``step_dir_name(250)`` -> ``"step-000250"`` (LoRA runs);
    ``step_dir_name(250, 0, 2.34561)`` -> ``"step-000250-epoch-00-loss=2.3456"`` (full runs).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative int, got {step!r}")
    name = f"{STEP_PREFIX}{step:06d}"
    if epoch is not None:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"checkpoint epoch must be a non-negative int, got {epoch!r}")
        name += f"-epoch-{epoch:02d}"
    if loss is not None:
        loss = float(loss)
        name += f"-loss={loss:.4f}" if math.isfinite(loss) else f"-loss={loss}"
    return name


def parse_step_dir(name: str) -> int | None:
    """The step encoded in a checkpoint dir name, or None if ``name`` is not a step dir.

    Only a hint for listing: never trust it over ``trainer_state.json``.
    """
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def is_transient_name(name: str) -> bool:
    """True for the hidden leftovers of an interrupted save, deletion or atomic file write."""
    return name.startswith((TMP_DIR_PREFIX, ASIDE_DIR_PREFIX, TRASH_DIR_PREFIX)) or (
        name.startswith(".") and ".tmp-" in name
    )
