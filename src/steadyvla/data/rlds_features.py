"""The features.json of a TFDS / RLDS dataset: its leaves, how their values decode, which to use.

`read_features` flattens the FeaturesDict into one `FeatureSpec` per leaf (full "/"-joined
path); `decode_tensor` and `decode_image` turn a record's raw values into arrays; and
`pick_feature` / `pick_action_features` resolve the image, action and instruction keys a user
names (or the defaults) to specs, with errors that list the valid names.
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}


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


# ---------------------------------------------------------------- decoding values


def decode_tensor(spec: FeatureSpec, raw: Sequence[Any], steps: int) -> np.ndarray:
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


# ---------------------------------------------------------------- choosing features


def pick_feature(
    features: dict[str, FeatureSpec],
    steps_key: str,
    key: str | None,
    defaults: Sequence[str],
    field: str,
    kinds: tuple[str, ...],
    *,
    source: Path,
    required: bool = True,
) -> FeatureSpec | None:
    """The feature named by `key` (or the first of `defaults` present) among `kinds`.

    A name is looked up under `steps_key/` first, then as a full path. Without `key`, an image
    falls back to the first image step feature, and an optional field (not `required`) to None;
    otherwise a ValueError lists the valid names of `source` (the features.json path).
    """
    explicit = key is not None
    allowed = kinds + (("tensor",) if explicit and field == "image_key" else ())
    for k in [key] if explicit else defaults:
        for full in (f"{steps_key}/{k}", k):
            spec = features.get(full)
            if spec is not None and spec.kind in allowed:
                return spec
    in_steps = [
        s
        for s in features.values()
        if s.kind in kinds and s.key.startswith(steps_key + "/")
    ]
    if not explicit and field == "image_key" and in_steps:
        return in_steps[0]
    if not explicit and not required:
        return None
    valid = [s.key for s in features.values() if s.kind in allowed]
    raise ValueError(
        f"{field}={key!r}: no {'/'.join(allowed)} feature of that name in "
        f"{source}; valid: {valid}"
    )


def pick_action_features(
    features: dict[str, FeatureSpec],
    steps_key: str,
    key: str | Sequence[str] | None,
    defaults: Sequence[str],
) -> list[FeatureSpec]:
    """The scalar/vector tensor leaves named by `key` (a name, a dict of tensors, or a list).

    `key` None means `defaults`. Leaves come in features.json order within each name.
    """
    keys = (
        list(defaults)
        if key is None
        else [key]
        if isinstance(key, str)
        else list(key)
    )
    specs: list[FeatureSpec] = []
    for k in keys:
        full = k if k.startswith(steps_key + "/") else f"{steps_key}/{k}"
        leaves = [
            s
            for s in features.values()
            if s.kind == "tensor" and (s.key == full or s.key.startswith(full + "/"))
        ]
        bad = [s.key for s in leaves if len(s.shape) > 1]
        if not leaves or bad:
            valid = [
                s.key
                for s in features.values()
                if s.kind == "tensor" and len(s.shape) <= 1
            ]
            raise ValueError(
                f"action_key={k!r}: {'not a scalar/vector' if bad else 'no'} tensor "
                f"feature {bad or full} in features.json; valid: {valid}"
            )
        specs.extend(leaves)
    return specs
