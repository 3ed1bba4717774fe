"""Write LeRobot v3.0 datasets with images inline in parquet (PNG bytes, no video).

The layout it writes, and the reader, are in `steadyvla.data.lerobot`. Episodes are streamed
one at a time into data parquet files; the metadata (episodes, tasks, stats, info.json) is
written at the end, and the whole dataset appears at its final path only once complete.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from steadyvla.atomic_files import fsync_tree, replace_dir
from steadyvla.data.lerobot import CODEBASE_VERSION, DATA_PATH, EPISODES_PATH

CHUNKS_SIZE = 1000  # files per chunk directory, LeRobot's default
DATA_FILE_SIZE_IN_MB = 100
VIDEO_FILE_SIZE_IN_MB = 500
# Small row groups bound what one random frame() reads from disk (~1-2 MB at 224 px).
ROW_GROUP_SIZE = 32
# zlib level 1: still lossless; ~3.5x faster than the default 6 on MetaWorld frames, ~8% larger.
PNG_COMPRESS_LEVEL = 1
_INDEX_FEATURES = {
    "timestamp": "float32",
    "frame_index": "int64",
    "episode_index": "int64",
    "index": "int64",
    "task_index": "int64",
}


@dataclass
class Episode:
    """One recorded episode: T frames of image, state and action, and its instruction."""

    images: np.ndarray  # [T, H, W, 3] uint8
    states: np.ndarray  # [T, S] float32
    actions: np.ndarray  # [T, A] float32
    task: str  # the instruction sentence


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _numeric_stats(values: np.ndarray) -> dict[str, list]:
    v = values.astype(np.float64).reshape(values.shape[0], -1)
    stats = {"min": v.min(0), "max": v.max(0), "mean": v.mean(0), "std": v.std(0)}
    stats.update({f"q{q:02d}": np.quantile(v, q / 100, axis=0) for q in (1, 10, 50, 90, 99)})
    return {"count": [int(v.shape[0])], **{k: a.tolist() for k, a in stats.items()}}


def _data_schema(image_key: str, state_dim: int, action_dim: int) -> pa.Schema:
    hf: dict[str, Any] = {image_key: {"_type": "Image"}}
    for key, dim in (("observation.state", state_dim), ("action", action_dim)):
        hf[key] = {"feature": {"dtype": "float32", "_type": "Value"}, "length": dim,
                   "_type": "Sequence"}
    hf.update({key: {"dtype": dt, "_type": "Value"} for key, dt in _INDEX_FEATURES.items()})
    fields = [
        pa.field(image_key, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        pa.field("observation.state", pa.list_(pa.float32(), state_dim)),
        pa.field("action", pa.list_(pa.float32(), action_dim)),
    ] + [pa.field(key, pa.from_numpy_dtype(np.dtype(dt))) for key, dt in _INDEX_FEATURES.items()]
    # The "huggingface" metadata lets `datasets` (and LeRobot through it) see the Image feature.
    return pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": hf}})})


def _tasks_table(tasks: list[str]) -> pa.Table:
    # LeRobot writes tasks with pandas: column task_index, index named "task"; mirror that.
    columns = [
        {"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
         "numpy_type": "int64", "metadata": None},
        {"name": "task", "field_name": "task", "pandas_type": "unicode",
         "numpy_type": "object", "metadata": None},
    ]
    pandas_meta = {"index_columns": ["task"], "column_indexes": [], "columns": columns,
                   "creator": {"library": "pyarrow", "version": pa.__version__},
                   "pandas_version": "2.2.0"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "task": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta)})


class _Writer:
    """Streams episodes into data parquet files and collects what the metadata needs."""

    def __init__(self, root: Path, fps: int, image_key: str, row_group_size: int, file_mb: float):
        self.root, self.fps, self.image_key = root, fps, image_key
        self.row_group_size, self.file_bytes_max = row_group_size, file_mb * 1024 * 1024
        self.tasks: dict[str, int] = {}
        self.episodes: list[dict[str, Any]] = []
        self.columns: dict[str, list[np.ndarray]] = {
            k: [] for k in ("observation.state", "action", *_INDEX_FEATURES)}
        self.shape: tuple | None = None
        self.schema: pa.Schema | None = None
        self.writer: pq.ParquetWriter | None = None
        self.chunk = self.file = self.file_bytes = self.total = 0
        self.pixels = np.zeros((4, 3))  # sum, sum of squares, min, max of sampled pixels
        self.pixels[2] = 255
        self.num_pixels = 0

    def add(self, ep: Episode) -> None:
        number = len(self.episodes)
        where = f"episode {number}"
        if not isinstance(ep.task, str) or not ep.task.strip():
            raise ValueError(f"{where}: task must be a non-empty string, got {ep.task!r}")
        if ep.images.ndim != 4 or ep.images.shape[-1] != 3 or ep.images.dtype != np.uint8:
            raise ValueError(f"{where}: images must be [T, H, W, 3] uint8, "
                             f"got {ep.images.shape} {ep.images.dtype}")
        t = ep.images.shape[0]
        for field, arr in (("states", ep.states), ("actions", ep.actions)):
            if arr.ndim != 2 or arr.shape[0] != t or t == 0:
                raise ValueError(
                    f"{where}: {field} must be [T={t}, dim] with T > 0, got {arr.shape}")
        shape = (ep.images.shape[1:], ep.states.shape[1], ep.actions.shape[1])
        if self.shape is None:
            self.shape, self.schema = shape, _data_schema(self.image_key, shape[1], shape[2])
        elif shape != self.shape:
            raise ValueError(f"{where}: image/state/action shapes {shape} differ from "
                             f"episode 0's {self.shape}")
        pngs = [_png(img) for img in ep.images]
        self._open_file(sum(map(len, pngs)))
        frame_index = np.arange(t, dtype=np.int64)
        cols = {
            "observation.state": ep.states.astype(np.float32),
            "action": ep.actions.astype(np.float32),
            "timestamp": (frame_index / self.fps).astype(np.float32),
            "frame_index": frame_index,
            "episode_index": np.full(t, number, np.int64),
            "index": np.arange(self.total, self.total + t, dtype=np.int64),
            "task_index": np.full(t, self.tasks.setdefault(ep.task, len(self.tasks)), np.int64),
        }
        arrays = {self.image_key: pa.StructArray.from_arrays(
            [pa.array(pngs, pa.binary()), pa.nulls(t, pa.string())], ["bytes", "path"])}
        for key, value in cols.items():
            self.columns[key].append(value)
            arrays[key] = (pa.FixedSizeListArray.from_arrays(value.ravel(), value.shape[1])
                           if value.ndim == 2 else value)
        self.writer.write_table(pa.table(arrays, schema=self.schema),
                                row_group_size=self.row_group_size)
        # Image stats from every 4th pixel row/column, as LeRobot also estimates them from samples.
        flat = ep.images[:, ::4, ::4].reshape(-1, 3).astype(np.float64)
        self.pixels[0] += flat.sum(0)
        self.pixels[1] += (flat * flat).sum(0)
        self.pixels[2] = np.minimum(self.pixels[2], flat.min(0))
        self.pixels[3] = np.maximum(self.pixels[3], flat.max(0))
        self.num_pixels += flat.shape[0]
        row = {"episode_index": number, "tasks": [ep.task], "length": t,
               "data/chunk_index": self.chunk, "data/file_index": self.file,
               "dataset_from_index": self.total, "dataset_to_index": self.total + t,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0}
        for key in ("observation.state", "action"):
            row.update({f"stats/{key}/{k}": v for k, v in _numeric_stats(cols[key]).items()})
        self.episodes.append(row)
        self.total += t

    def _open_file(self, new_bytes: int) -> None:
        # Like LeRobot, start a new file (never splitting an episode) once the size target is hit.
        if self.writer is not None and self.file_bytes + new_bytes > self.file_bytes_max:
            self.close()
            self.file = (self.file + 1) % CHUNKS_SIZE
            self.chunk += self.file == 0
        if self.writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer, self.file_bytes = pq.ParquetWriter(path, self.schema), 0
        self.file_bytes += new_bytes

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write_meta(self, robot_type: str, state_names: list[str] | None,
                   action_names: list[str] | None, file_mb: float) -> dict[str, Any]:
        """Write episodes, tasks and stats; return info.json's content (written last by caller)."""
        if not self.episodes:
            raise ValueError("no episodes to write: the episodes iterable was empty")
        ep_path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        ep_path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.episodes), ep_path)
        pq.write_table(_tasks_table(list(self.tasks)), self.root / "meta" / "tasks.parquet")
        total, sq, low, high = self.pixels
        mean = total / self.num_pixels
        std = np.sqrt(np.maximum(sq / self.num_pixels - mean**2, 0.0))
        image = {k: (v / 255.0).reshape(3, 1, 1).tolist()
                 for k, v in (("min", low), ("max", high), ("mean", mean), ("std", std))}
        stats = {self.image_key: {**image, "count": [self.total]}}
        stats.update({k: _numeric_stats(np.concatenate(v)) for k, v in self.columns.items()})
        (self.root / "meta" / "stats.json").write_text(json.dumps(stats, indent=4))
        hw, state_dim, action_dim = self.shape
        features: dict[str, Any] = {
            self.image_key: {"dtype": "image", "shape": list(hw),
                             "names": ["height", "width", "channels"]},
            "observation.state": {"dtype": "float32", "shape": [state_dim], "names": state_names},
            "action": {"dtype": "float32", "shape": [action_dim], "names": action_names},
            **{k: {"dtype": dt, "shape": [1], "names": None} for k, dt in _INDEX_FEATURES.items()},
        }
        n = len(self.episodes)
        return {
            "codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": n, "total_frames": self.total, "total_tasks": len(self.tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": file_mb,
            "video_files_size_in_mb": VIDEO_FILE_SIZE_IN_MB, "fps": self.fps,
            "splits": {"train": f"0:{n}"}, "data_path": DATA_PATH, "video_path": None,
            "features": features,
        }


def write_lerobot_dataset(
    root: Path,
    episodes: Iterable[Episode],
    *,
    fps: int,
    robot_type: str,
    image_key: str = "observation.image",
    state_names: list[str] | None = None,
    action_names: list[str] | None = None,
    row_group_size: int = ROW_GROUP_SIZE,
    data_file_size_in_mb: float = DATA_FILE_SIZE_IN_MB,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write episodes as a LeRobot v3.0 dataset with PNG images inline; returns `root`.

    Episodes are streamed (one in memory at a time). Everything is written into a temporary
    sibling directory, fsynced, then renamed to `root`, so an interrupted write never leaves
    a dataset that looks complete. `extra_meta`, if given, goes to `meta/steadyvla.json`
    (LeRobot ignores it). An existing `root` is an error unless it is empty or `overwrite`.
    """
    root = Path(root)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if root.exists() and not overwrite and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not empty (pass overwrite=True)")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        writer = _Writer(tmp, fps, image_key, row_group_size, data_file_size_in_mb)
        try:
            for episode in episodes:
                writer.add(episode)
        finally:
            writer.close()
        info = writer.write_meta(robot_type, state_names, action_names, data_file_size_in_mb)
        if extra_meta is not None:
            (tmp / "meta" / "steadyvla.json").write_text(json.dumps(extra_meta, indent=2))
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=4))
        fsync_tree(tmp)
        if overwrite and root.exists():
            replace_dir(tmp, root)
        else:
            try:
                os.replace(tmp, root)  # succeeds onto a missing or empty directory only
            except OSError:
                raise FileExistsError(f"{root} appeared while writing; not replacing it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
