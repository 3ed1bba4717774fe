"""`use_wandb: true`: mirror every metrics.jsonl row to Weights & Biases (optional extra `wandb`).

The W&B run id lives in `<run_dir>/wandb.json` with the last step sent, so a resumed run continues
the same W&B run (`resume="allow"`) and never sends a step twice: a run killed after its last
checkpoint has already sent the steps it is about to redo, and bit-exact resume makes them equal.
Without an API key (WANDB_API_KEY or a ~/.netrc entry) or network the run is logged offline under
`<run_dir>/wandb/`; `wandb sync` uploads it later. WANDB_MODE, when set, wins.
"""

from __future__ import annotations

import json
import netrc
import os
import secrets
import socket
from pathlib import Path
from typing import Any, Callable

from steadyvla.config import ConfigError, RunConfig

WANDB_STATE = "wandb.json"
WANDB_HOST = "api.wandb.ai"


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((WANDB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def wandb_mode() -> str:
    """online when credentials exist and the server answers, else offline; an explicit WANDB_MODE wins."""
    return os.environ.get("WANDB_MODE") or ("online" if _has_credentials() and _reachable() else "offline")


class WandbTracker:
    """One W&B run per steadyvla run dir; `log` skips steps that this W&B run already has."""

    def __init__(self, run_dir: Path, cfg: RunConfig, log: Callable[[str], None] = print):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("config field `use_wandb`: true, but the `wandb` package is not installed; "
                              "pip install 'steadyvla[wandb]' or set use_wandb: false") from err
        self.state_path = Path(run_dir) / WANDB_STATE
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        run_id = state.get("id") or secrets.token_hex(4)  # W&B-style 8-character id
        self.last_step = int(state.get("last_step", 0))
        mode = wandb_mode()
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, id=run_id, resume="allow",
                              mode=mode, dir=str(run_dir), name=Path(run_dir).name, config=cfg.to_dict())
        self._save(run_id)
        log(f"W&B run {run_id} ({mode}, project {cfg.wandb_project})"
            + (f", continuing after step {self.last_step}" if self.last_step else ""))

    def _save(self, run_id: str | None = None) -> None:
        self.run_id = run_id or self.run_id
        self.state_path.write_text(json.dumps({"id": self.run_id, "last_step": self.last_step}) + "\n")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Send the metrics of `step` unless this W&B run already has that step."""
        if step <= self.last_step:
            return
        self.run.log(dict(metrics), step=step)
        self.last_step = step
        self._save()

    def close(self) -> None:
        self.run.finish()
