"""Action statistics and OpenVLA's BOUNDS_Q99 action normalization.

The statistics file is `dataset_statistics.json` in the run directory, keyed by dataset name::

    {name: {"action": {"mean", "std", "max", "min", "q01", "q99", "mask"},
            "proprio": {...},            # optional, same keys without "mask"
            "num_transitions": int, "num_trajectories": int}}

It is what inference uses to map predicted [-1, 1] actions back to robot units (`unnorm_key`),
so it is written once, atomically, and read back with its structure checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.atomic_files import atomic_write_text

_STAT_KEYS = ("mean", "std", "max", "min", "q01", "q99")
# q99 - q01 below this is a constant dimension; dividing by it would blow noise up to +-1.
_MIN_RANGE = 1e-8


def _vector_statistics(values: np.ndarray, field: str) -> dict[str, list[float]]:
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(
            f"{field} must be a non-empty [num_transitions, dim] array, got shape {values.shape}"
        )
    values = values.astype(np.float64, copy=False)
    if not np.all(np.isfinite(values)):
        bad = int(np.argwhere(~np.isfinite(values))[0, 0])
        raise ValueError(f"{field} contains a non-finite value (first at row {bad})")
    stats = {
        "mean": values.mean(axis=0),
        "std": values.std(axis=0),
        "max": values.max(axis=0),
        "min": values.min(axis=0),
        "q01": np.quantile(values, 0.01, axis=0),
        "q99": np.quantile(values, 0.99, axis=0),
    }
    return {key: [float(v) for v in arr] for key, arr in stats.items()}


def compute_action_statistics(
    actions: np.ndarray,
    num_trajectories: int,
    mask: np.ndarray | None = None,
    *,
    proprio: np.ndarray | None = None,
) -> dict[str, Any]:
    """Statistics of one dataset's actions in the `dataset_statistics.json` entry format.

    Args:
        actions: [num_transitions, A] raw actions.
        num_trajectories: number of episodes the actions come from.
        mask: [A] bool, True where BOUNDS_Q99 normalization applies. Default: every
            dimension except the last (the gripper, which stays as recorded).
        proprio: optional [num_transitions, S] proprioceptive states; adds a "proprio" entry.
    """
    actions = np.asarray(actions)
    action_stats: dict[str, Any] = _vector_statistics(actions, "actions")
    dim = actions.shape[1]
    if mask is None:
        mask_arr = np.ones(dim, dtype=bool)
        mask_arr[-1] = False
    else:
        mask_arr = np.asarray(mask, dtype=bool)
        if mask_arr.shape != (dim,):
            raise ValueError(f"mask must have shape ({dim},) like one action, got {mask_arr.shape}")
    action_stats["mask"] = [bool(m) for m in mask_arr]
    if int(num_trajectories) < 1:
        raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
    result: dict[str, Any] = {
        "action": action_stats,
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": int(num_trajectories),
    }
    if proprio is not None:
        proprio = np.asarray(proprio)
        if proprio.shape[0] != actions.shape[0]:
            raise ValueError(
                f"proprio has {proprio.shape[0]} rows but actions has {actions.shape[0]}; "
                "they must describe the same transitions"
            )
        result["proprio"] = _vector_statistics(proprio, "proprio")
    return result


def _check_action_entry(name: str, entry: Any) -> None:
    # q01/q99 are what un-normalization needs; OpenVLA treats a missing mask as all-True.
    if not isinstance(entry, dict) or not isinstance(entry.get("action"), dict):
        raise ValueError(f"statistics for {name!r} must be a dict with an 'action' dict")
    action = entry["action"]
    missing = [k for k in ("q01", "q99") if k not in action]
    if missing:
        raise ValueError(f"statistics for {name!r}: 'action' lacks {missing}")
    dim = len(action["q01"])
    for key in (*_STAT_KEYS, "mask"):
        if key in action and len(action[key]) != dim:
            raise ValueError(
                f"statistics for {name!r}: action.{key} has {len(action[key])} values, "
                f"action.q01 has {dim}; all must match"
            )
    for key in ("num_transitions", "num_trajectories"):
        if key in entry and not isinstance(entry[key], int):
            raise ValueError(
                f"statistics for {name!r}: {key} must be an int, got {entry[key]!r}")


def write_dataset_statistics(path: Path, stats_by_name: dict[str, dict]) -> None:
    """Write `{dataset_name: statistics}` as JSON, atomically (temp file, fsync, rename)."""
    path = Path(path)
    for name, entry in stats_by_name.items():
        _check_action_entry(name, entry)
    text = json.dumps(stats_by_name, indent=2, allow_nan=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text + "\n")


def load_dataset_statistics(path: Path) -> dict[str, dict]:
    """Read a `dataset_statistics.json` written by `write_dataset_statistics` (or OpenVLA)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset statistics file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path} must hold a non-empty {{dataset_name: statistics}} object")
    for name, entry in data.items():
        _check_action_entry(name, entry)
    return data


def _bounds(action_stats: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Accept the whole dataset entry too: callers often hold stats[name], not stats[name]["action"].
    if "action" in action_stats and isinstance(action_stats["action"], dict):
        action_stats = action_stats["action"]
    try:
        low = np.asarray(action_stats["q01"], dtype=np.float64)
        high = np.asarray(action_stats["q99"], dtype=np.float64)
    except KeyError as e:
        raise ValueError(f"action statistics lack {e.args[0]!r} (need q01, q99, mask)") from None
    mask = np.asarray(action_stats.get("mask", np.ones_like(low, dtype=bool)), dtype=bool)
    if not (low.shape == high.shape == mask.shape) or low.ndim != 1:
        raise ValueError(
            f"action statistics q01/q99/mask must be equal-length vectors, got shapes "
            f"{low.shape}/{high.shape}/{mask.shape}"
        )
    return low, high, mask


def _check_dim(values: np.ndarray, low: np.ndarray, field: str) -> None:
    if values.shape[-1:] != low.shape:
        raise ValueError(
            f"{field} last dimension is {values.shape[-1:]} but the statistics describe "
            f"{low.shape[0]}-d actions"
        )


def normalize_actions(actions: np.ndarray, action_stats: dict) -> np.ndarray:
    """BOUNDS_Q99: `2*(x-q01)/(q99-q01) - 1` clipped to [-1, 1] on masked dims; others unchanged.

    A dimension with q99 == q01 (constant in the data) maps to 0.
    """
    actions = np.asarray(actions)
    low, high, mask = _bounds(action_stats)
    _check_dim(actions, low, "actions")
    span = high - low
    safe = span > _MIN_RANGE
    scaled = 2.0 * (actions - low) / np.where(safe, span, 1.0) - 1.0
    scaled = np.where(safe, np.clip(scaled, -1.0, 1.0), 0.0)
    out = np.where(mask, scaled, actions)
    return out.astype(np.float32) if actions.dtype != np.float64 else out


def unnormalize_actions(normalized: np.ndarray, action_stats: dict) -> np.ndarray:
    """Inverse of `normalize_actions` on masked dims: `0.5*(x+1)*(q99-q01) + q01`."""
    normalized = np.asarray(normalized)
    low, high, mask = _bounds(action_stats)
    _check_dim(normalized, low, "normalized actions")
    raw = 0.5 * (normalized + 1.0) * (high - low) + low
    out = np.where(mask, raw, normalized)
    return out.astype(np.float32) if normalized.dtype != np.float64 else out

