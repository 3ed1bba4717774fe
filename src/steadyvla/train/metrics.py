"""Training metrics OpenVLA users know, and the metrics log (metrics.jsonl + TensorBoard).

After a resume the log is cut back to the checkpoint's step (jsonl rewritten atomically;
TensorBoard via `purge_step`), so every step appears exactly once however often the run died.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from steadyvla.atomic_files import atomic_write_text
from steadyvla.checkpoint.layout import METRICS_JSONL, TENSORBOARD_DIR
from steadyvla.model.action_tokenizer import ActionTokenizer
from steadyvla.model.vla import VLAOutput

# metrics.jsonl timing keys (wall clock: not deterministic; resume tests compare every other key)
STEP_TIME_S = "step_time_s"  # wall seconds of the optimizer step the line logs
CKPT_BLOCKING_S = "ckpt_blocking_s"  # seconds the most recent save blocked training (first line after it)
DATA_WAIT_S = "data_wait_s"  # seconds the host waited for the data loader's batches in the step the line logs
TIMING_METRIC_KEYS = (STEP_TIME_S, CKPT_BLOCKING_S, DATA_WAIT_S)


@torch.no_grad()
def action_metrics(output: VLAOutput, action_tokenizer: ActionTokenizer) -> dict[str, torch.Tensor]:
    """`train_loss`, `action_accuracy` (argmax == label on action positions), `l1_loss`
    (L1 between decoded bin centers of prediction and label), as 0-dim float32 tensors on the
    model's device: computed without boolean indexing or `.item()`, so the step never waits for
    the device; `MetricsInFlight` copies them to the host once per logged step."""
    preds = output.logits.argmax(dim=-1)
    mask = action_tokenizer.is_action_token(output.labels)
    correct = (preds == output.labels) & mask
    n = mask.sum().clamp(min=1)
    l1 = (action_tokenizer.decode_torch(preds) - action_tokenizer.decode_torch(output.labels)).abs()
    return {
        "train_loss": output.loss.detach().float(),
        "action_accuracy": correct.sum() / n,
        "l1_loss": torch.where(mask, l1, 0.0).sum() / n,  # 0 when there is no action position
    }


def mean_metrics(rows: list[dict[str, torch.Tensor | float]]) -> dict[str, torch.Tensor | float]:
    """Mean of each key over micro-batches, in float64 (sum in a fixed order: deterministic)."""
    return {k: sum(_as_float64(r[k]) for r in rows) / len(rows) for k in rows[0]}


def _as_float64(value: torch.Tensor | float) -> torch.Tensor | float:
    return value.double() if isinstance(value, torch.Tensor) else value


class MetricsInFlight:
    """A metrics dict's device values on their way to the host. The copy is queued now, right behind
    the kernels that compute the values, into pinned memory; `values()` then waits for that copy
    only. Reading them with `.tolist()` a step later would instead queue the copy behind everything
    launched since (the whole next step), and the host would stall until the device is idle, leaving
    the device idle while the host prepares the step after."""

    def __init__(self, metrics: dict[str, torch.Tensor | float]):
        self.keys = list(metrics)
        self.tensor_keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        self.floats = {k: float(v) for k, v in metrics.items() if k not in self.tensor_keys}
        self.host: torch.Tensor | None = None
        self.copied: torch.cuda.Event | None = None
        if not self.tensor_keys:
            return
        stacked = torch.stack([metrics[k].detach().double().reshape(()) for k in self.tensor_keys])
        if stacked.device.type != "cuda":
            self.host = stacked
            return
        self.host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
        self.host.copy_(stacked, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record(torch.cuda.current_stream(stacked.device))

    def values(self) -> dict[str, float]:
        """The Python floats, in the metrics dict's key order (waits for the copy if it is still on its way)."""
        if self.copied is not None:
            self.copied.synchronize()
        out = dict(self.floats)
        if self.host is not None:
            out.update(zip(self.tensor_keys, self.host.tolist()))
        return {k: out[k] for k in self.keys}


def read_metrics_values(metrics: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Python floats of a metrics dict whose values may be device tensors: one transfer for all."""
    return MetricsInFlight(metrics).values()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a crash is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


class MetricsLogger:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int, *, tensorboard: bool = True, enabled: bool = True):
        self.path = run_dir / METRICS_JSONL
        self.best_train_loss: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0  # early-stopping counter
        self._file = None  # stays None on ranks other than 0: they keep state but write nothing
        self._tb = None
        self.tracker = None  # e.g. a WandbTracker: gets every logged row too
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if int(r.get("step", 0)) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step makes TensorBoard drop events a killed run wrote after the checkpoint.
            self._tb = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=resume_step + 1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of optimizer step `step`."""
        if "train_loss" in metrics and (self.best_train_loss is None or metrics["train_loss"] < self.best_train_loss):
            self.best_train_loss, self.best_step = metrics["train_loss"], step
        if self._file is None:
            return
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def sync(self) -> None:
        """Make everything logged so far durable (called before a checkpoint is taken)."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            self._tb.flush()

    def state_dict(self) -> dict[str, Any]:
        return {"best_train_loss": self.best_train_loss, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_train_loss = state.get("best_train_loss")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
