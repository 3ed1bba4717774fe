"""RLDS reader without TensorFlow: a TFDS builder directory of TFRecord shards as a FrameSource.

Open-X / LIBERO RLDS datasets store one episode per record: a `tf.train.Example` whose features
are the step fields flattened and stacked (`steps/observation/image` = one encoded image per step,
`steps/action` = T*A floats, ...). The layout is read from `features.json`, not hard-coded.

One streaming pass builds a small index — (shard, byte offset, length, first step, step count)
per episode — plus the actions (needed for statistics anyway). Random access to a frame reads
and parses only that episode's record, and only the last parsed record is kept, so host memory
is bounded by one episode whatever the dataset size: there is no shuffle buffer.

TFRecord framing and record parsing are in `steadyvla.data.tfrecord_io`; features.json
parsing, value decoding and key resolution in `steadyvla.data.rlds_features`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.data.frames import Frame
from steadyvla.data.rlds_features import (
    decode_image,
    decode_tensor,
    pick_action_features,
    pick_feature,
    read_features,
)
from steadyvla.data.tfrecord_io import Record, iter_tfrecord, read_record

# Defaults that fit Open-X / LIBERO-style RLDS; the first key present in features.json wins.
DEFAULT_IMAGE_KEYS = ("observation/image", "observation/image_primary", "observation/agentview_rgb")
DEFAULT_ACTION_KEYS = ("action",)
DEFAULT_INSTRUCTION_KEYS = ("language_instruction", "observation/natural_language_instruction")

_SHARD_RE = re.compile(r"-(?P<split>[^-/]+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")


def resolve_version_dir(builder_dir: Path) -> Path:
    """Return the TFDS version folder (with dataset_info.json) of a builder dir: the newest one."""
    builder_dir = Path(builder_dir)
    if (builder_dir / "dataset_info.json").is_file():
        return builder_dir
    versions = (
        [d for d in builder_dir.iterdir() if (d / "dataset_info.json").is_file()]
        if builder_dir.is_dir()
        else []
    )
    if not versions:
        raise FileNotFoundError(
            f"{builder_dir} is not a TFDS builder directory: expected version "
            "subfolders such as 1.0.0/ holding dataset_info.json and features.json"
        )

    def version_key(d: Path) -> tuple[int, ...]:
        return tuple(int(p) if p.isdigit() else -1 for p in d.name.split("."))

    return max(versions, key=version_key)


def is_rlds_dataset(path: Path) -> bool:
    """True if `path` is a TFDS builder dir (or one of its version folders) with features.json."""
    try:
        return (resolve_version_dir(Path(path)) / "features.json").is_file()
    except (FileNotFoundError, NotADirectoryError):
        return False



def _segments(
    first: np.ndarray | None, last: np.ndarray | None, steps: int
) -> list[tuple[int, int]]:
    """Split a record's steps into episodes at is_first / after is_last markers."""
    starts = {0}
    if first is not None:
        starts.update(int(i) for i in np.flatnonzero(first))
    if last is not None:
        starts.update(int(i) + 1 for i in np.flatnonzero(last))
    bounds = sorted(s for s in starts if s < steps) + [steps]
    return [(a, b) for a, b in pairwise(bounds) if b > a]


# ---------------------------------------------------------------- the reader


class RLDSFrames:
    """Random access to the frames of one split of an RLDS dataset (a FrameSource).

    `image_key`, `action_key` and `instruction_key` name step fields relative to `steps/`
    (e.g. "observation/wrist_image"); an episode-level field may be named by its full path.
    `action_key` may also name a dict of tensors (RT-1 style) or a list of keys: they are
    concatenated in features.json order. Defaults: DEFAULT_*_KEYS, first one present.
    """

    format_name = "rlds"

    def __init__(
        self,
        builder_dir: Path,
        split: str = "train",
        image_key: str | None = None,
        action_key: str | Sequence[str] | None = None,
        instruction_key: str | None = None,
        verify_crc: bool = False,
    ) -> None:
        self.version_dir = resolve_version_dir(Path(builder_dir))
        self.name = self.version_dir.parent.name
        self.split = split
        features_json = self.version_dir / "features.json"
        self.steps_key, self.features = read_features(features_json)
        info = json.loads((self.version_dir / "dataset_info.json").read_text())
        self.shards, shard_lengths = self._find_shards(info, split)
        specs, steps = self.features, self.steps_key
        self.image_spec = pick_feature(
            specs, steps, image_key, DEFAULT_IMAGE_KEYS, "image_key", ("image",),
            source=features_json,
        )
        self.action_specs = pick_action_features(specs, steps, action_key, DEFAULT_ACTION_KEYS)
        self.instruction_spec = pick_feature(
            specs, steps, instruction_key, DEFAULT_INSTRUCTION_KEYS, "instruction_key", ("text",),
            source=features_json, required=False,
        )
        self._verify_crc = verify_crc
        self._cached: tuple[tuple[int, int], Record, int] | None = None
        self._build_index(shard_lengths)

    # -- FrameSource
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_episodes(self) -> int:
        return len(self._index)

    def actions(self) -> np.ndarray:
        """All actions [num_frames, A] float32 (read-only), gathered during the index pass."""
        return self._actions

    def frame(self, index: int) -> Frame:
        """Decode frame `index` (global over all episodes of the split)."""
        if not 0 <= index < len(self):
            raise IndexError(f"frame index {index} out of range [0, {len(self)})")
        ep = int(np.searchsorted(self._starts, index, side="right")) - 1
        offset_in_ep = int(index - self._starts[ep])
        rec, steps = self._record(ep)
        step = int(self._index[ep, 3]) + offset_in_ep
        spec = self.image_spec
        raw = rec.values(spec.key)
        image = decode_image(
            raw[step] if spec.kind == "image" else decode_tensor(spec, raw, steps)[step]
        )
        return Frame(
            image=image,
            action=self._actions[index].copy(),
            instruction=self._instruction(rec, step),
            episode_index=ep,
            frame_index=offset_in_ep,
        )

    # -- extras used by `describe_dataset` and the samplers
    def episode_lengths(self) -> np.ndarray:
        """Number of frames of every episode, in index order."""
        return np.diff(self._starts)

    def episode_range(self, episode: int) -> tuple[int, int]:
        """Global [start, stop) frame indices of `episode`."""
        return int(self._starts[episode]), int(self._starts[episode + 1])

    def instructions(self) -> list[str]:
        """The instruction of each episode (its first step's), in index order."""
        return [self._instruction_table[i] for i in self._instruction_ids]

    def episode(self, episode: int) -> dict[str, Any]:
        """Every step field of `episode`: arrays for tensors, str lists for text, encoded images."""
        rec, steps = self._record(episode)
        a, n = int(self._index[episode, 3]), int(self._index[episode, 4])
        out: dict[str, Any] = {}
        for spec in self.features.values():
            if not spec.key.startswith(self.steps_key + "/") or not rec.has(spec.key):
                continue
            raw, key = rec.values(spec.key), spec.key[len(self.steps_key) + 1 :]
            if spec.kind == "tensor":
                out[key] = decode_tensor(spec, raw, steps)[a : a + n]
            elif spec.kind == "text":
                out[key] = [bytes(b).decode("utf-8", errors="replace") for b in raw[a : a + n]]
            elif spec.kind == "image":
                out[key] = [bytes(b) for b in raw[a : a + n]]
        return out

    def describe_features(self) -> list[str]:
        """One line per feature of features.json, marking the fields this reader uses."""
        used = {s.key: "action" for s in self.action_specs}
        used[self.image_spec.key] = "image"
        if self.instruction_spec is not None:
            used[self.instruction_spec.key] = "instruction"
        return [
            f"{s.key}: {s.describe()}" + (f"  <- {used[s.key]}" if s.key in used else "")
            for s in self.features.values()
        ]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cached"] = None  # a parsed record is a cache, not state
        return state

    # -- internals
    def _find_shards(self, info: dict[str, Any], split: str) -> tuple[list[Path], list[int] | None]:
        splits = {s.get("name"): s for s in info.get("splits", [])}
        found = sorted(
            (
                p
                for p in self.version_dir.iterdir()
                if (m := _SHARD_RE.search(p.name)) and m["split"] == split
            ),
            key=lambda p: p.name,
        )
        if not found:
            raise FileNotFoundError(
                f"{self.version_dir}: no TFRecord shards for split={split!r} (expected files "
                f"like <name>-{split}.tfrecord-00000-of-00001); splits in dataset_info.json: "
                f"{sorted(splits)}"
            )
        total = int(_SHARD_RE.search(found[0].name)["n"])
        if len(found) != total:
            raise FileNotFoundError(
                f"{self.version_dir}: split {split!r} has {len(found)} of "
                f"{total} shards; the dataset copy is incomplete"
            )
        lengths = splits.get(split, {}).get("shardLengths")
        return found, [int(x) for x in lengths] if lengths else None


    def _num_steps(self, rec: Record, where: str) -> int:
        counts: dict[str, int] = {}
        for spec in self.features.values():
            if (
                spec.kind == "other"
                or not spec.key.startswith(self.steps_key + "/")
                or not rec.has(spec.key)
            ):
                continue
            n = len(rec.values(spec.key))
            if spec.kind == "tensor" and spec.encoding == "none":
                per = int(np.prod(spec.shape))
                if per <= 0:
                    continue
                n //= per
            counts[spec.key] = n
        if len(set(counts.values())) != 1:
            raise ValueError(
                f"{where}: step features disagree on the episode length (or none is "
                f"present): {counts}"
            )
        return next(iter(counts.values()))

    def _build_index(self, shard_lengths: list[int] | None) -> None:
        rows: list[tuple[int, int, int, int, int]] = []
        actions: list[np.ndarray] = []
        table: dict[str, int] = {}
        ids: list[int] = []
        for si, path in enumerate(self.shards):
            records = 0
            for offset, payload in iter_tfrecord(path, self._verify_crc):
                records += 1
                rec = Record(payload)
                steps = self._num_steps(rec, f"{path.name} at byte {offset}")
                acts = self._record_actions(rec, steps)
                flags = [
                    decode_tensor(self.features[k], rec.values(k), steps).astype(bool)
                    if k in self.features and rec.has(k)
                    else None
                    for k in (f"{self.steps_key}/is_first", f"{self.steps_key}/is_last")
                ]
                for a, b in _segments(flags[0], flags[1], steps):
                    rows.append((si, offset, len(payload), a, b - a))
                    actions.append(acts[a:b])
                    ids.append(table.setdefault(self._instruction(rec, a), len(table)))
            if shard_lengths is not None and records != shard_lengths[si]:
                raise ValueError(
                    f"{path}: {records} episodes, but dataset_info.json shardLengths "
                    f"says {shard_lengths[si]}; the shard is truncated or stale"
                )
        self._index = np.array(rows, dtype=np.int64).reshape(-1, 5)
        self._starts = np.concatenate([[0], np.cumsum(self._index[:, 4])]).astype(np.int64)
        width = sum(int(np.prod(s.shape)) for s in self.action_specs)
        self._actions = (np.concatenate(actions) if actions else np.zeros((0, width))).astype(
            np.float32
        )
        self._actions.flags.writeable = False  # shared by every caller of actions()
        self._instruction_table = list(table)
        self._instruction_ids = ids

    def _record_actions(self, rec: Record, steps: int) -> np.ndarray:
        parts = [
            decode_tensor(s, rec.values(s.key), steps).reshape(steps, -1) for s in self.action_specs
        ]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _instruction(self, rec: Record, step: int) -> str:
        spec = self.instruction_spec
        if spec is None or not rec.has(spec.key):
            return ""
        raw = rec.values(spec.key)
        in_steps = spec.key.startswith(self.steps_key + "/")
        return (
            bytes(raw[step] if in_steps else raw[0]).decode("utf-8", errors="replace")
            if raw
            else ""
        )

    def _record(self, episode: int) -> tuple[Record, int]:
        if not 0 <= episode < self.num_episodes:
            raise IndexError(f"episode {episode} out of range [0, {self.num_episodes})")
        shard, offset, length = (int(x) for x in self._index[episode, :3])
        if self._cached is None or self._cached[0] != (shard, offset):
            rec = Record(read_record(self.shards[shard], offset, length))
            steps = self._num_steps(rec, f"{self.shards[shard].name} at byte {offset}")
            self._cached = ((shard, offset), rec, steps)
        return self._cached[1], self._cached[2]
