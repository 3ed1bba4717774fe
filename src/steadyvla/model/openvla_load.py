"""Load an OpenVLA Hugging Face directory: module tree from config.json, weights streamed.

The model is built with parameters on the meta device (buffers such as the rotary frequencies
are real), then each shard's tensors are read straight onto the target device and assigned in
place of the meta parameters: host memory stays near one shard for a GPU target, and nothing is
ever initialised twice. Before any tensor data is read, every shard's header is checked against
the model: missing, unexpected and shape-mismatched keys are one error naming the first keys,
their shard and the expected vs found shapes. Nothing is silently re-initialised.

On the CPU, safetensors hands out copy-on-write mappings of the shard files: pages load when
touched and the model is the only copy (an in-place merge copies just the pages it writes). The
files must therefore stay unchanged while the model is in use; steadyvla never writes into a
directory it loaded from (merge writes a new one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open

from steadyvla.model.openvla_config import (
    CONFIG_JSON, OpenVLAFormatError, read_json, spec_from_openvla_config,
)
from steadyvla.model.openvla_keys import SINGLE_WEIGHTS, WEIGHTS_INDEX, from_openvla_key
from steadyvla.model.spec import VLASpec
from steadyvla.model.vla import VLA

_REPORT_KEYS = 5  # how many offending keys an error names


@dataclass(frozen=True)
class OpenVLADir:
    """A checked OpenVLA directory: its parsed config, build spec, norm_stats and weight files."""

    path: Path
    config: dict
    spec: VLASpec
    norm_stats: dict
    weight_map: dict[str, str]  # checkpoint key -> file name

    @property
    def shard_files(self) -> list[str]:
        """Weight files in index order."""
        return list(dict.fromkeys(self.weight_map.values()))


def _weight_map(path: Path) -> dict[str, str]:
    index_path, single = path / WEIGHTS_INDEX, path / SINGLE_WEIGHTS
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise OpenVLAFormatError(f"{index_path}: field `weight_map` missing or empty (expected {{key: shard file}})")
        for shard in dict.fromkeys(weight_map.values()):
            if not (path / shard).is_file():
                raise OpenVLAFormatError(f"{path / shard}: shard listed in {WEIGHTS_INDEX} is missing")
        return weight_map
    if single.is_file():
        return {key: SINGLE_WEIGHTS for key in _shard_shapes(single)}
    raise OpenVLAFormatError(f"{path}: no {WEIGHTS_INDEX} or {SINGLE_WEIGHTS} (not an OpenVLA checkpoint directory)")


def _shard_shapes(shard: Path) -> dict[str, list[int]]:
    try:
        with safe_open(str(shard), framework="pt") as f:
            return {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise OpenVLAFormatError(f"{shard}: unreadable safetensors file ({err}); expected a complete shard") from err


def read_openvla_dir(path: Path | str) -> OpenVLADir:
    """Parse and check config.json, preprocessor_config.json and the weight index of `path`."""
    path = Path(path)
    if not path.is_dir():
        raise OpenVLAFormatError(f"{path}: not a directory (expected an OpenVLA Hugging Face checkpoint directory)")
    config = read_json(path / CONFIG_JSON)
    spec = spec_from_openvla_config(config, path)
    norm_stats = config.get("norm_stats") or {}
    if not isinstance(norm_stats, dict):
        raise OpenVLAFormatError(f"{path / CONFIG_JSON}: field `norm_stats` must be an object keyed by dataset name")
    return OpenVLADir(path, config, spec, norm_stats, _weight_map(path))


def check_weights(src: OpenVLADir, model: torch.nn.Module | None = None) -> None:
    """Compare every shard's header with the model `src.spec` builds (on the meta device unless
    given); reads no tensor data."""
    model = model if model is not None else build_empty(src.spec)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    found: dict[str, tuple[str, list[int]]] = {}
    for shard in src.shard_files:
        for key, shape in _shard_shapes(src.path / shard).items():
            found[from_openvla_key(key)] = (shard, shape)
    missing = [k for k in expected if k not in found]
    unexpected = [f"{k} (in {found[k][0]})" for k in found if k not in expected]
    mismatched = [f"{k} in {found[k][0]}: expected {expected[k]}, found {found[k][1]}"
                  for k in expected if k in found and found[k][1] != expected[k]]
    problems = [f"{what} ({len(items)}): {'; '.join(items[:_REPORT_KEYS])}"
                for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", mismatched)) if items]
    if problems:
        raise OpenVLAFormatError(f"{src.path}: weights do not match config.json: " + " | ".join(problems))


def build_empty(spec: VLASpec) -> VLA:
    """The VLA with parameters on the meta device (buffers real, on the CPU)."""
    with init_empty_weights(include_buffers=False):
        return VLA(spec)


def load_weights(src: OpenVLADir, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> VLA:
    """Build the VLA of `src` and stream its weights in, shard by shard, onto `device`.

    `dtype` None keeps each tensor's stored dtype (bf16 for OpenVLA); otherwise floating tensors
    are cast as they are read.
    """
    model = build_empty(src.spec)
    check_weights(src, model)
    device = torch.device(device)
    for shard in src.shard_files:
        path = src.path / shard
        part = {}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    part[from_openvla_key(key)] = tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise OpenVLAFormatError(f"{path}: reading tensor data failed ({err}); the file may be truncated") from err
        model.load_state_dict(part, strict=False, assign=True)
        del part
    return model.to(device)  # moves the buffers; parameters are already there
