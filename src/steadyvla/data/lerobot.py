"""LeRobot v3.0 datasets: the on-disk layout and a random-access frame reader.

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
The writer is `steadyvla.data.lerobot_writer`.
"""

from __future__ import annotations

import io
import json
import os
from bisect import bisect_right
from collections import OrderedDict
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
