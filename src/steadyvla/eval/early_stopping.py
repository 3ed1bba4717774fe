"""Early stopping on the periodic evaluation score: best score, evaluations without improvement,
patience left. Pure Python state that goes into every checkpoint (through the periodic-eval
hook), so a resumed run stops at the same step as one that never stopped.

An evaluation improves when there is no best yet, or when its score is higher than the best by at
least `min_delta` (a float tolerance makes a success rate going from 0.2 to 0.3 count as +0.1).
`patience` consecutive evaluations without improvement stop the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SCORE_TOLERANCE = 1e-9  # success rates are ratios of small integers: 0.3 - 0.2 < 0.1 in floating point


@dataclass
class EarlyStopping:
    """Tracks the best score; `should_stop` once `patience` evaluations in a row did not improve."""

    patience: int
    min_delta: float = 0.0
    enabled: bool = True
    best_score: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[list[float]] = field(default_factory=list)  # [step, score] of every evaluation

    def observe(self, step: int, score: float) -> bool:
        """Record the score of the evaluation at `step`; True if it is the new best."""
        improved = self.best_score is None or (
            score > self.best_score and score - self.best_score >= self.min_delta - SCORE_TOLERANCE)
        if improved:
            self.best_score, self.best_step, self.evals_without_improvement = score, step, 0
        else:
            self.evals_without_improvement += 1
        self.history.append([step, score])
        return improved

    @property
    def patience_left(self) -> int:
        """Evaluations without improvement still allowed before the run stops."""
        return max(0, self.patience - self.evals_without_improvement)

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.best_score is not None and self.evals_without_improvement >= self.patience

    def state_dict(self) -> dict[str, Any]:
        """The JSON-able progress (patience, min_delta and enabled come from the config)."""
        return {"best_score": self.best_score, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score = state.get("best_score")
        self.best_step = state.get("best_step")
        self.evals_without_improvement = int(state.get("evals_without_improvement", 0))
        self.history = [list(row) for row in state.get("history", [])]
