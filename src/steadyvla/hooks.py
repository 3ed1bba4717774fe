"""Extension points of the one training loop (the method plugs in here; the baseline has none).

The interface the loop offers its plug-ins, so it sits below both `train/` and `method/`."""

from __future__ import annotations

from typing import Any

import torch


class TrainHook:
    """Base class: every method is a no-op. State returned by `state_dict` goes into checkpoints."""

    name = "hook"

    def on_step_start(self, step: int) -> None:
        """Called before the first micro-batch of optimizer step `step` (0-based)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after all micro-batches' backward, before gradient clipping and the update."""

    def on_step_end(self, step: int) -> dict[str, float]:
        """Called after the update of step `step` (1-based count of finished steps); returns metrics."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, JSON-able values) to checkpoint."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
