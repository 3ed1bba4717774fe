"""Open a dataset the way the users' YAML names it, whatever its format, and describe it.

A dataset lives at `data_root_dir/dataset_name` for every format; the format is read from the
files, never from a flag, so the same two config keys work for RLDS and LeRobot datasets:
- RLDS: a TFDS builder directory holding version folders (`1.0.0/`) with dataset_info.json,
  features.json and `<name>-<split>.tfrecord-XXXXX-of-YYYYY` shards (a version folder works too);
- LeRobot v3: a dataset root with `meta/info.json`.

`describe_dataset` uses the FrameSource protocol plus, where a reader offers them, the optional
`episode_lengths()`, `instructions()` (one per episode; a plain list is read as the task list)
and `describe_features()` (or a LeRobot-style `features` dict).
"""

from __future__ import annotations

import difflib
from pathlib import Path

import numpy as np

from steadyvla.data.frames import FrameSource

FORMATS = ("rlds", "lerobot")
_FORMAT_OF_CLASS = {"RLDSFrames": "rlds", "LeRobotFrames": "lerobot"}

_EXPECTED = (
    "expected an RLDS/TFDS builder directory (version subfolders such as 1.0.0/ holding "
    "dataset_info.json, features.json and <name>-<split>.tfrecord-XXXXX-of-YYYYY shards) or a "
    "LeRobot v3 dataset root (meta/info.json)"
)


def detect_format(path: Path) -> str:
    """Return "rlds" or "lerobot" for the dataset at `path`; a clear error for anything else."""
    from steadyvla.data.lerobot import is_lerobot_dataset
    from steadyvla.data.rlds import is_rlds_dataset

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory; {_EXPECTED}")
    if is_lerobot_dataset(path):
        return "lerobot"
    if is_rlds_dataset(path):
        return "rlds"
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:10]
    raise ValueError(f"{path} is not a dataset steadyvla can read: {_EXPECTED}; it holds {found}")


def dataset_path(data_root_dir: Path, dataset_name: str) -> Path:
    """`data_root_dir/dataset_name`, or an error naming both keys and the closest existing name."""
    root = Path(data_root_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"data_root_dir={str(root)!r} does not exist or is not a directory")
    path = root / dataset_name
    if not path.exists():
        names = [p.name for p in root.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(dataset_name, names, n=1)
        hint = (
            f"; did you mean dataset_name={close[0]!r}?"
            if close
            else f"; it holds {sorted(names)[:10]}"
        )
        raise FileNotFoundError(f"dataset_name={dataset_name!r}: {path} does not exist{hint}")
    return path


def open_frame_source(
    data_root_dir: Path, dataset_name: str, image_key: str | None = None
) -> FrameSource:
    """Open the dataset at `data_root_dir/dataset_name` as a FrameSource, detecting its format.

    `image_key` picks the camera (RLDS: a step field such as "observation/wrist_image";
    LeRobot: a feature such as "observation.images.wrist"); None takes the reader's default.
    """
    path = dataset_path(data_root_dir, dataset_name)
    if detect_format(path) == "rlds":
        from steadyvla.data.rlds import RLDSFrames

        return RLDSFrames(path, image_key=image_key)
    from steadyvla.data.lerobot import LeRobotFrames

    return LeRobotFrames(path, image_key=image_key)


def _instructions(source: FrameSource) -> tuple[list[str], str]:
    offered = getattr(source, "instructions", None)
    if callable(offered):
        return list(offered()), "per episode"
    if isinstance(offered, (list, tuple)):
        return list(offered), "task list"
    n = len(source)
    # No per-episode list offered: sample a few frames rather than decode the whole dataset.
    picks = np.unique(np.linspace(0, n - 1, num=min(n, 20)).astype(int)) if n else []
    return [source.frame(int(i)).instruction for i in picks], f"sampled from {len(picks)} frames"


def _action_table(actions: np.ndarray) -> list[str]:
    if actions.size == 0:
        return ["  (no actions)"]
    a = actions.astype(np.float64)
    stats = {
        "mean": a.mean(0),
        "std": a.std(0),
        "min": a.min(0),
        "q01": np.quantile(a, 0.01, axis=0),
        "q99": np.quantile(a, 0.99, axis=0),
        "max": a.max(0),
    }
    lines = ["  dim " + "".join(f"{k:>11}" for k in stats)]
    for d in range(a.shape[1]):
        lines.append(f"  {d:>3} " + "".join(f"{v[d]:>11.4f}" for v in stats.values()))
    return lines


def describe_dataset(source: FrameSource, max_instructions: int = 5) -> str:
    """A human-readable report: episodes, frames, features, instructions, action statistics."""
    fmt = getattr(
        source, "format_name", _FORMAT_OF_CLASS.get(type(source).__name__, type(source).__name__)
    )
    lines = [f"dataset: {source.name} (format: {fmt})"]
    summary = f"episodes: {source.num_episodes}  frames: {len(source)}"
    if callable(getattr(source, "episode_lengths", None)):
        lengths = np.asarray(source.episode_lengths())
        if lengths.size:
            summary += (
                f"  (episode length min {lengths.min()}, mean {lengths.mean():.1f}, "
                f"max {lengths.max()})"
            )
    lines.append(summary)

    if callable(getattr(source, "describe_features", None)):
        lines.append("features:")
        lines += [f"  {line}" for line in source.describe_features()]
    elif isinstance(getattr(source, "features", None), dict):  # LeRobot info.json style
        lines.append("features:")
        lines += [
            f"  {k}: {v.get('dtype', '?')} {v.get('shape', '')}"
            if isinstance(v, dict)
            else f"  {k}: {v}"
            for k, v in source.features.items()
        ]

    texts, how = _instructions(source)
    unique = list(dict.fromkeys(texts))
    lines.append(f"instructions: {len(unique)} unique ({how})")
    lines += [f"  - {t!r}" for t in unique[:max_instructions]]
    if len(unique) > max_instructions:
        lines.append(f"  ... and {len(unique) - max_instructions} more")

    actions = np.asarray(source.actions())
    width = actions.shape[1] if actions.ndim == 2 else 0
    lines.append(f"actions: {len(actions)} x {width}")
    lines += _action_table(actions.reshape(len(actions), -1) if actions.size else actions)
    return "\n".join(lines)
