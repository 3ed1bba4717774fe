"""LeRobot v3.0 datasets: a writer (images inline in parquet) and a random-access frame reader.

Layout, as LeRobot v3.0 writes it::

    meta/info.json                          schema, fps, counts, path templates
    meta/stats.json                         per-feature min/max/mean/std/count (+ quantiles)
    meta/tasks.parquet                      task string (pandas index "task") -> task_index
    meta/episodes/chunk-000/file-000.parquet  one row per episode: length, tasks, file + index range
    data/chunk-000/file-000.parquet         one row per frame
    videos/<key>/chunk-000/file-000.mp4     only for features of dtype "video"

The reader never holds decoded images: it reads one parquet row group at a time (keeping the
last few), decodes a single PNG per `frame()` call, and keeps only the small numeric columns
in memory. The sampler, not the reader, decides the order, which keeps data position resumable.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from steadyvla.data.frames import Frame

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
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


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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
        _fsync_tree(tmp)
        if overwrite and root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "ds")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, root)  # succeeds onto a missing or empty directory only
            except OSError:
                raise FileExistsError(f"{root} appeared while writing; not replacing it") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def is_lerobot_dataset(path: Path) -> bool:
    """True if `path` holds a complete LeRobot v3 dataset (info.json, tasks, episodes, data)."""
    path = Path(path)
    try:
        info = json.loads((path / "meta" / "info.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and str(info.get("codebase_version", "")).startswith("v3.")
        and (path / "meta" / "tasks.parquet").is_file()
        and any((path / "meta" / "episodes").glob("*/*.parquet"))
        and any((path / "data").glob("*/*.parquet"))
    )


def _read_tasks(path: Path) -> list[str]:
    table = pq.read_table(path)
    pandas_meta = json.loads((table.schema.metadata or {}).get(b"pandas", b"{}"))
    candidates = [c for c in pandas_meta.get("index_columns", []) if isinstance(c, str)]
    candidates += ["task", "__index_level_0__"]
    column = next((c for c in candidates if c in table.column_names), None)
    if column is None or "task_index" not in table.column_names:
        raise ValueError(
            f"{path}: expected columns 'task' and 'task_index', got {table.column_names}")
    by_index = dict(zip(table["task_index"].to_pylist(), table[column].to_pylist(), strict=True))
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(
            f"{path}: task_index values must be 0..{len(by_index) - 1}, got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


class LeRobotFrames:
    """Random access to the frames of a local LeRobot v3.0 dataset (implements `FrameSource`).

    Holds only the numeric columns in memory; images are decoded one per `frame()` call from
    the parquet row group that holds them (the last few row groups are cached) or, for video
    features, through `steadyvla.data.video.decode_frame`.
    """

    _CACHED_ROW_GROUPS = 2

    def __init__(self, root: Path, image_key: str | None = None):
        self.root = Path(root)
        if not is_lerobot_dataset(self.root):
            raise FileNotFoundError(
                f"{self.root} is not a complete LeRobot v3 dataset (needs meta/info.json with "
                "codebase_version v3.x, meta/tasks.parquet, meta/episodes/ and data/ parquet files)"
            )
        self.info: dict[str, Any] = json.loads((self.root / "meta" / "info.json").read_text())
        self.name: str = self.root.name
        self.features: dict[str, dict] = self.info["features"]
        self.fps = self.info["fps"]
        visual = [k for k, f in self.features.items() if f.get("dtype") in ("image", "video")]
        if image_key is None:
            if not visual:
                raise ValueError(f"{self.root}: info.json has no image or video feature")
            image_key = visual[0]
        elif image_key not in visual:
            raise ValueError(
                f"image_key {image_key!r} is not an image/video feature; valid: {visual}")
        self.image_key: str = image_key
        self._is_video = self.features[image_key]["dtype"] == "video"
        self.instructions: list[str] = _read_tasks(self.root / "meta" / "tasks.parquet")

        episode_files = sorted((self.root / "meta" / "episodes").glob("*/*.parquet"))
        wanted = ["episode_index", "length", "dataset_from_index", "dataset_to_index",
                  "data/chunk_index", "data/file_index"]
        if self._is_video:
            wanted += [f"videos/{image_key}/{c}"
                       for c in ("chunk_index", "file_index", "from_timestamp")]
        tables = [pq.read_table(p, columns=wanted) for p in episode_files]
        self._episodes = pa.concat_tables(tables).sort_by("episode_index").to_pydict()
        self._ep_by_index = {e: i for i, e in enumerate(self._episodes["episode_index"])}

        eps = self._episodes
        files = sorted(set(zip(eps["data/chunk_index"], eps["data/file_index"])))
        self._paths = [self.root / self.info["data_path"].format(chunk_index=c, file_index=f)
                       for c, f in files]
        self._file_starts: list[int] = []
        self._rg_starts: list[list[int]] = []
        start = 0
        for path in self._paths:
            meta = pq.read_metadata(path)
            self._file_starts.append(start)
            rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            offsets = np.cumsum([0] + rows)
            self._rg_starts.append(offsets[:-1].tolist())
            start += meta.num_rows
        self._len = start
        if self._len != sum(self._episodes["length"]):
            raise ValueError(
                f"{self.root}: data files hold {self._len} frames but meta/episodes lists "
                f"{sum(self._episodes['length'])}; the dataset is inconsistent"
            )
        cols = ["episode_index", "frame_index", "task_index", "timestamp"]
        small = pa.concat_tables([pq.read_table(p, columns=cols) for p in self._paths])
        self._small = {c: small[c].to_numpy() for c in cols}
        self._actions: np.ndarray | None = None
        self._cache: OrderedDict[tuple[int, int], pa.Array] = OrderedDict()
        self._handles: dict[int, pq.ParquetFile] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._len

    @property
    def num_episodes(self) -> int:
        """Number of episodes."""
        return len(self._episodes["episode_index"])

    def actions(self) -> np.ndarray:
        """All actions as [num_frames, A] float32; reads only the action column."""
        if self._actions is None:
            chunks = [pq.read_table(p, columns=["action"])["action"] for p in self._paths]
            arr = pa.chunked_array([c for col in chunks for c in col.chunks]).combine_chunks()
            dim = self.features["action"]["shape"][0]
            self._actions = np.asarray(arr.flatten(), dtype=np.float32).reshape(-1, dim)
        return self._actions.copy()

    def frame(self, index: int) -> Frame:
        """The frame at global `index` (0 <= index < len(self))."""
        if not 0 <= index < self._len:
            raise IndexError(f"frame index {index} out of range for {self._len} frames")
        if self._actions is None:
            self.actions()
        episode = int(self._small["episode_index"][index])
        image = self._video_image(index, episode) if self._is_video else self._inline_image(index)
        return Frame(
            image=image,
            action=self._actions[index].copy(),
            instruction=self.instructions[int(self._small["task_index"][index])],
            episode_index=episode,
            frame_index=int(self._small["frame_index"][index]),
        )

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DataLoader workers get a copy without open files or cached row groups.
        return {**self.__dict__, "_handles": {}, "_cache": OrderedDict()}

    def _parquet(self, file_no: int) -> pq.ParquetFile:
        if os.getpid() != self._pid:  # forked DataLoader worker: never share open handles
            self._handles, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        if file_no not in self._handles:
            # pre_buffer=False: an open file then holds no read-ahead buffers, so memory does not grow
            # with the number of data files a worker has touched (same read speed for row groups)
            self._handles[file_no] = pq.ParquetFile(self._paths[file_no], pre_buffer=False)
        return self._handles[file_no]

    def _inline_image(self, index: int) -> np.ndarray:
        file_no = bisect_right(self._file_starts, index) - 1
        local = index - self._file_starts[file_no]
        rg = bisect_right(self._rg_starts[file_no], local) - 1
        handle = self._parquet(file_no)
        key = (file_no, rg)
        if key in self._cache:
            self._cache.move_to_end(key)
        else:
            column = handle.read_row_group(rg, columns=[self.image_key])[self.image_key]
            self._cache[key] = column.combine_chunks().field("bytes")
            while len(self._cache) > self._CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        data = self._cache[key][local - self._rg_starts[file_no][rg]].as_py()
        if data is None:
            raise ValueError(f"frame {index}: {self.image_key} has no embedded image bytes")
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"), dtype=np.uint8)

    def _video_image(self, index: int, episode: int) -> np.ndarray:
        from steadyvla.data.video import decode_frame  # optional: needs PyAV

        row = self._ep_by_index[episode]
        prefix = f"videos/{self.image_key}/"
        path = self.root / self.info["video_path"].format(
            video_key=self.image_key,
            chunk_index=self._episodes[prefix + "chunk_index"][row],
            file_index=self._episodes[prefix + "file_index"][row],
        )
        timestamp = float(self._episodes[prefix + "from_timestamp"][row])
        return decode_frame(path, timestamp + float(self._small["timestamp"][index]))
