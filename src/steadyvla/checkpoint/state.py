"""Complete trainer state as safetensors (tensors) + JSON (everything else) — no pickle anywhere.

`snapshot_*` functions run synchronously at an optimizer-step boundary and return CPU copies, so
the files can be written in the background while training continues; `restore_*` functions
put a loaded state back into live objects.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

OPTIM_PREFIX = "optim"
RNG_PREFIX = "rng"


# Pinned host buffers reused across saves (allocating pinned memory costs more than the copy).
# Safe because a new snapshot is taken only after the previous save finished writing.
_PINNED: dict[str, torch.Tensor] = {}


def cpu_copy(t: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """A CPU copy. CUDA tensors go to (reused, when `key` is given) pinned memory without
    blocking: the copy is ordered before any later kernel on the stream, and `wait_for_copies()`
    runs on the writer thread before the bytes are read."""
    if not t.is_cuda:
        return t.detach().to("cpu", copy=True).contiguous()
    buf = _PINNED.get(key) if key is not None else None
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        if key is not None:
            _PINNED[key] = buf
    return buf.copy_(t.detach(), non_blocking=True)


def wait_for_copies() -> None:
    """Block until the device-to-host copies issued by the snapshot are done (writer thread)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def snapshot_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state -> (tensors keyed `optim.<param>.<name>`, JSON-able param groups + scalars)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                key = f"{OPTIM_PREFIX}.{pid}.{name}"
                tensors[key] = cpu_copy(value, key)
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `snapshot_optimizer`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        prefix, pid, name = key.split(".", 2)
        if prefix == OPTIM_PREFIX:
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def snapshot_rng(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states of Python, NumPy, torch CPU and this rank's CUDA device (each rank owns one
    device; touching the others would create a CUDA context on every GPU from every rank)."""
    tensors = {f"{RNG_PREFIX}.rank{rank}.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors[f"{RNG_PREFIX}.rank{rank}.cuda"] = torch.cuda.get_rng_state().cpu()
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def restore_rng(rank: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `snapshot_rng` for this rank."""
    torch.set_rng_state(tensors[f"{RNG_PREFIX}.rank{rank}.torch_cpu"])
    cuda_key = f"{RNG_PREFIX}.rank{rank}.cuda"
    if torch.cuda.is_available() and cuda_key in tensors:
        torch.cuda.set_rng_state(tensors[cuda_key])
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def snapshot_tensors(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of a named tensor dict under `prefix.` (used for method state)."""
    return {f"{prefix}.{k}": cpu_copy(v, f"{prefix}.{k}") for k, v in tensors.items()}


def select_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix.` with the prefix removed."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
