"""RLDS reader without TensorFlow: a TFDS builder directory of TFRecord shards as a FrameSource.

Open-X / LIBERO RLDS datasets store one episode per record: a `tf.train.Example` whose features
are the step fields flattened and stacked (`steps/observation/image` = one encoded image per step,
`steps/action` = T*A floats, ...). The layout is read from `features.json`, not hard-coded.

One streaming pass builds a small index — (shard, byte offset, length, first step, step count)
per episode — plus the actions (needed for statistics anyway). Random access to a frame reads
and parses only that episode's record, and only the last parsed record is kept, so host memory
is bounded by one episode whatever the dataset size: there is no shuffle buffer.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.data.frames import Frame
from steadyvla.optional import require

# Defaults that fit Open-X / LIBERO-style RLDS; the first key present in features.json wins.
DEFAULT_IMAGE_KEYS = ("observation/image", "observation/image_primary", "observation/agentview_rgb")
DEFAULT_ACTION_KEYS = ("action",)
DEFAULT_INSTRUCTION_KEYS = ("language_instruction", "observation/natural_language_instruction")

_SHARD_RE = re.compile(r"-(?P<split>[^-/]+)\.tfrecord-(?P<i>\d{5})-of-(?P<n>\d{5})$")
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


def _example_pb2() -> Any:
    return require("tfrecord.example_pb2", extra="rlds", purpose="reading RLDS (tfrecord + protobuf)")


# ---------------------------------------------------------------- TFRecord framing


def _masked_crc(data: bytes) -> int:
    import crc32c  # installed with tfrecord; only needed when verifying

    crc = crc32c.crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def iter_tfrecord(path: Path, verify_crc: bool = False) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset of the payload, payload) for every record of a TFRecord file.

    Framing: u64 length, u32 masked crc32c of the length, payload, u32 masked crc32c of payload.
    """
    with open(path, "rb", buffering=1 << 20) as f:
        pos = 0
        while True:
            head = f.read(12)
            if not head:
                return
            if len(head) < 12:
                raise ValueError(f"{path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", head[:8])
            payload, tail = f.read(length), f.read(4)
            if len(payload) < length or len(tail) < 4:
                raise ValueError(f"{path}: truncated record at byte {pos}: expected {length} bytes")
            if verify_crc and (
                struct.unpack("<I", head[8:])[0] != _masked_crc(head[:8])
                or struct.unpack("<I", tail)[0] != _masked_crc(payload)
            ):
                raise ValueError(f"{path}: CRC mismatch in the record at byte {pos}")
            yield pos + 12, payload
            pos += 16 + length


def read_record(path: Path, offset: int, length: int) -> bytes:
    """Read one record payload at a known byte offset (from `iter_tfrecord`)."""
    with open(path, "rb") as f:
        f.seek(offset)
        payload = f.read(length)
    if len(payload) != length:
        raise ValueError(
            f"{path}: record at byte {offset} is truncated (file changed since indexing?)"
        )
    return payload


# ---------------------------------------------------------------- features.json


@dataclass(frozen=True)
class FeatureSpec:
    """One leaf of a TFDS FeaturesDict: where it lives and how it is serialized."""

    key: str  # full "/"-joined path, e.g. "steps/observation/image"
    kind: str  # "image" | "tensor" | "text" | "other"
    dtype: str
    shape: tuple[int, ...]
    encoding: str  # tensor: none|bytes|zlib; image: png|jpeg|...

    def describe(self) -> str:
        """One line such as `image uint8 [256, 256, 3] jpeg`."""
        extra = "" if self.encoding in ("", "none") else f" {self.encoding}"
        return f"{self.kind} {self.dtype} {list(self.shape)}{extra}".rstrip()


def _flatten_spec(node: dict[str, Any], prefix: str, out: dict[str, FeatureSpec]) -> None:
    if "featuresDict" in node:
        for name, child in node["featuresDict"].get("features", {}).items():
            _flatten_spec(child, f"{prefix}/{name}" if prefix else name, out)
        return
    if "sequence" in node:
        if "/" not in prefix:  # the top-level Dataset of steps: its leaves are stacked per step
            _flatten_spec(node["sequence"]["feature"], prefix, out)
        else:  # a sequence inside a step is ragged; not something a frame needs
            out[prefix] = FeatureSpec(prefix, "other", "", (), "sequence")
        return
    if "image" in node:
        info = node["image"]
        dims = tuple(int(d) for d in info.get("shape", {}).get("dimensions", []))
        out[prefix] = FeatureSpec(
            prefix, "image", info.get("dtype", "uint8"), dims, info.get("encodingFormat", "png")
        )
    elif "text" in node:
        out[prefix] = FeatureSpec(prefix, "text", "string", (), "")
    elif "tensor" in node:
        info = node["tensor"]
        dims = tuple(int(d) for d in info.get("shape", {}).get("dimensions", []))
        dtype = info.get("dtype", "float32")
        kind = "text" if dtype == "string" and not dims else "tensor"
        out[prefix] = FeatureSpec(prefix, kind, dtype, dims, info.get("encoding", "none"))
    elif "classLabel" in node:
        out[prefix] = FeatureSpec(prefix, "tensor", "int64", (), "none")
    else:
        out[prefix] = FeatureSpec(prefix, "other", "", (), "")


def read_features(path: Path) -> tuple[str, dict[str, FeatureSpec]]:
    """Parse a TFDS `features.json` into (steps key, {full path: FeatureSpec})."""
    root = json.loads(Path(path).read_text())
    steps = [
        k for k, v in root.get("featuresDict", {}).get("features", {}).items() if "sequence" in v
    ]
    if len(steps) != 1:
        raise ValueError(
            f"{path}: expected exactly one top-level sequence feature (RLDS `steps`), "
            f"found {steps or 'none'}"
        )
    specs: dict[str, FeatureSpec] = {}
    _flatten_spec(root, "", specs)
    return steps[0], specs


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


# ---------------------------------------------------------------- one record


class _Record:
    """A parsed episode record (Example, or SequenceExample with per-step feature lists)."""

    def __init__(self, payload: bytes) -> None:
        proto = _example_pb2().SequenceExample.FromString(payload)  # an Example parses as this too
        self._context = proto.context.feature
        self._lists = proto.feature_lists.feature_list

    def has(self, key: str) -> bool:
        return key in self._context or key in self._lists

    def values(self, key: str) -> Sequence[Any]:
        """The flat list of values of `key`, concatenated over steps for feature lists."""
        if key in self._context:
            return _feature_values(self._context[key])
        if key in self._lists:
            return [v for f in self._lists[key].feature for v in _feature_values(f)]
        raise KeyError(key)


def _feature_values(feature: Any) -> Sequence[Any]:
    kind = feature.WhichOneof("kind")
    return getattr(feature, kind).value if kind else []


def _tensor(spec: FeatureSpec, raw: Sequence[Any], steps: int) -> np.ndarray:
    """Values of a step tensor feature as an array [steps, *shape]."""
    dtype = np.dtype("float32" if spec.dtype == "bfloat16" else spec.dtype)
    if spec.encoding in ("bytes", "zlib"):
        blobs = [zlib.decompress(b) if spec.encoding == "zlib" else b for b in raw]
        flat = np.frombuffer(b"".join(blobs), dtype=dtype)
    else:
        proto_dtype = np.float32 if spec.dtype in _FLOAT_DTYPES else np.int64
        flat = np.asarray(raw, dtype=proto_dtype).astype(dtype, copy=False)
    try:
        return flat.reshape((steps, *spec.shape))
    except ValueError:
        raise ValueError(
            f"feature {spec.key}: {flat.size} values do not fit shape "
            f"{[steps, *spec.shape]} (steps x features.json shape)"
        ) from None


def decode_image(data: bytes | np.ndarray) -> np.ndarray:
    """Decode PNG/JPEG bytes (or pass through a raw array) to [H, W, 3] uint8 RGB."""
    if isinstance(data, np.ndarray):
        img = data if data.ndim == 3 else data[..., None]
        return np.ascontiguousarray(np.broadcast_to(img, img.shape[:2] + (3,)), dtype=np.uint8)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.array(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)


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
        self.steps_key, self.features = read_features(self.version_dir / "features.json")
        info = json.loads((self.version_dir / "dataset_info.json").read_text())
        self.shards, shard_lengths = self._find_shards(info, split)
        self.image_spec = self._pick(image_key, DEFAULT_IMAGE_KEYS, "image_key", ("image",))
        self.action_specs = self._pick_actions(action_key)
        self.instruction_spec = self._pick(
            instruction_key, DEFAULT_INSTRUCTION_KEYS, "instruction_key", ("text",), required=False
        )
        self._verify_crc = verify_crc
        self._cached: tuple[tuple[int, int], _Record, int] | None = None
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
        image = decode_image(raw[step] if spec.kind == "image" else _tensor(spec, raw, steps)[step])
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
                out[key] = _tensor(spec, raw, steps)[a : a + n]
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

    def _pick(
        self,
        key: str | None,
        defaults: Sequence[str],
        field: str,
        kinds: tuple[str, ...],
        required: bool = True,
    ) -> FeatureSpec | None:
        explicit = key is not None
        allowed = kinds + (("tensor",) if explicit and field == "image_key" else ())
        for k in [key] if explicit else defaults:
            for full in (f"{self.steps_key}/{k}", k):
                spec = self.features.get(full)
                if spec is not None and spec.kind in allowed:
                    return spec
        in_steps = [
            s
            for s in self.features.values()
            if s.kind in kinds and s.key.startswith(self.steps_key + "/")
        ]
        if not explicit and field == "image_key" and in_steps:
            return in_steps[0]
        if not explicit and not required:
            return None
        valid = [s.key for s in self.features.values() if s.kind in allowed]
        raise ValueError(
            f"{field}={key!r}: no {'/'.join(allowed)} feature of that name in "
            f"{self.version_dir / 'features.json'}; valid: {valid}"
        )

    def _pick_actions(self, key: str | Sequence[str] | None) -> list[FeatureSpec]:
        keys = (
            list(DEFAULT_ACTION_KEYS)
            if key is None
            else [key]
            if isinstance(key, str)
            else list(key)
        )
        specs: list[FeatureSpec] = []
        for k in keys:
            full = k if k.startswith(self.steps_key + "/") else f"{self.steps_key}/{k}"
            leaves = [
                s
                for s in self.features.values()
                if s.kind == "tensor" and (s.key == full or s.key.startswith(full + "/"))
            ]
            bad = [s.key for s in leaves if len(s.shape) > 1]
            if not leaves or bad:
                valid = [
                    s.key
                    for s in self.features.values()
                    if s.kind == "tensor" and len(s.shape) <= 1
                ]
                raise ValueError(
                    f"action_key={k!r}: {'not a scalar/vector' if bad else 'no'} tensor "
                    f"feature {bad or full} in features.json; valid: {valid}"
                )
            specs.extend(leaves)
        return specs

    def _num_steps(self, rec: _Record, where: str) -> int:
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
                rec = _Record(payload)
                steps = self._num_steps(rec, f"{path.name} at byte {offset}")
                acts = self._record_actions(rec, steps)
                flags = [
                    _tensor(self.features[k], rec.values(k), steps).astype(bool)
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

    def _record_actions(self, rec: _Record, steps: int) -> np.ndarray:
        parts = [_tensor(s, rec.values(s.key), steps).reshape(steps, -1) for s in self.action_specs]
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _instruction(self, rec: _Record, step: int) -> str:
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

    def _record(self, episode: int) -> tuple[_Record, int]:
        if not 0 <= episode < self.num_episodes:
            raise IndexError(f"episode {episode} out of range [0, {self.num_episodes})")
        shard, offset, length = (int(x) for x in self._index[episode, :3])
        if self._cached is None or self._cached[0] != (shard, offset):
            rec = _Record(read_record(self.shards[shard], offset, length))
            steps = self._num_steps(rec, f"{self.shards[shard].name} at byte {offset}")
            self._cached = ((shard, offset), rec, steps)
        return self._cached[1], self._cached[2]
