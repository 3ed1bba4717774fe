"""Extension points of the one training loop (the method and periodic evaluation plug in here; the
baseline has none).

The interface the loop offers its plug-ins, so it sits below `train/`, `method/` and `eval/`."""

from __future__ import annotations

from typing import Any

import torch


class TrainHook:
    """Base class: every method is a no-op. State returned by `state_dict` goes into checkpoints
    (keyed by `name`, so several hooks coexist)."""

    name = "hook"

    def on_step_start(self, step: int) -> None:
        """Called before the first micro-batch of optimizer step `step` (0-based)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after all micro-batches' backward, before gradient clipping and the update."""

    def on_step_end(self, step: int) -> dict[str, float]:
        """Called after the update of step `step` (1-based count of finished steps); returns metrics
        that are averaged across ranks."""
        return {}

    def at_step_boundary(self, step: int) -> dict[str, float]:
        """Called on every rank after `on_step_end` and the cross-rank averaging, before the step's
        checkpoint decision; returns metrics that are already equal on every rank (logged as they
        are). A non-empty result forces a metrics line for the step (e.g. evaluation results)."""
        return {}

    def wants_checkpoint(self, step: int) -> bool:
        """True to have the loop save a checkpoint at step `step` even off the `save_steps` grid."""
        return False

    def protected_steps(self) -> set[int]:
        """Steps whose checkpoints retention (`keep_last_k`) must never delete (e.g. the best one)."""
        return set()

    def should_stop(self) -> bool:
        """True to end training after the current step (the loop saves a checkpoint first)."""
        return False

    def stop_message(self) -> str:
        """Why `should_stop` is true, for the user."""
        return f"{self.name} asked to stop"

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) to checkpoint."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (empty dicts: the checkpoint has no state of this hook)."""
