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
_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def pinned_buffer(key: str | None, like: torch.Tensor) -> torch.Tensor:
    """The reused host buffer for `key` shaped like `like` (allocated on first use; pinned when
    CUDA is there: device-to-host copies from pinned memory can be asynchronous)."""
    buf = _PINNED.get(key) if key is not None else None
    if buf is None or buf.shape != like.shape or buf.dtype != like.dtype:
        buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=torch.cuda.is_available())
        if key is not None:
            _PINNED[key] = buf
    return buf


def cpu_copy(t: torch.Tensor, key: str | None = None) -> torch.Tensor:
    """A CPU copy. CUDA tensors go to (reused, when `key` is given) pinned memory without
    blocking, on the current stream (inside `device_to_host_copies`: the side stream); the bytes
    may be read only once `DeviceCopies.wait()` returned (the writer thread calls it)."""
    if not t.is_cuda:
        if key is None or t.device.type != "cpu":
            return t.detach().to("cpu", copy=True).contiguous()
        return pinned_buffer(key, t).copy_(t.detach())  # the same reuse as on CUDA, so CPU tests exercise it
    buf = pinned_buffer(key, t)
    if _ACTIVE and _ACTIVE[-1].stream is not None:
        _ACTIVE[-1].pending.append((buf, t.detach()))  # issued together when the block ends
        return buf
    return buf.copy_(t.detach(), non_blocking=True)


_ACTIVE: list["DeviceCopies"] = []  # the DeviceCopies block cpu_copy is called in, if any


class DeviceCopies:
    """The device-to-host copies of one snapshot: issued on a side stream so they overlap the next
    step's forward and backward; the training stream waits for them only before its next update
    (`before_update`), the writer thread before it reads the bytes (`wait`)."""

    def __init__(self, device: torch.device | None):
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        self.events: list[torch.cuda.Event] = []
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (host buffer, device tensor)
        if device is not None and device.type == "cuda":
            if device not in _COPY_STREAMS:
                _COPY_STREAMS[device] = torch.cuda.Stream(device)
            self.stream = _COPY_STREAMS[device]

    def __enter__(self) -> "DeviceCopies":
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # copy what the step wrote
            self._context = torch.cuda.stream(self.stream)
            self._context.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _ACTIVE.pop()
        if self.stream is not None:
            try:
                self._issue()
            finally:
                self._context.__exit__(*exc)
                self.events.append(self.stream.record_event())

    def _issue(self) -> None:
        # one foreach call instead of thousands of Python-level copy_ calls (the 7B adapter + AdamW
        # moments are ~2,700 tensors): that per-call overhead was most of a save's blocking time
        pending, self.pending = self.pending, []
        if not pending:
            return
        dst, src = [d for d, _ in pending], [s for _, s in pending]
        try:
            torch._foreach_copy_(dst, src, non_blocking=True)
        except (RuntimeError, TypeError, AttributeError):
            for d, s in pending:
                d.copy_(s, non_blocking=True)

    def mark_current_stream(self) -> None:
        """Also wait for copies issued on the training stream so far (e.g. hook state)."""
        if self.device is not None and self.device.type == "cuda":
            self.events.append(torch.cuda.current_stream(self.device).record_event())

    def before_update(self) -> None:
        """Make the training stream wait (on the device, not the host) until the copies are done."""
        if self.device is not None and self.device.type == "cuda":
            for event in self.events:
                torch.cuda.current_stream(self.device).wait_event(event)

    def wait(self) -> None:
        """Block the calling (writer) thread until every copy is done."""
        for event in self.events:
            event.synchronize()


def wait_for_copies() -> None:
    """Block until every device-to-host copy issued so far is done (whole device)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state as `optimizer.state_dict()` packs it, without building that dict (it
    walks every parameter: milliseconds per save on the 7B): (live tensors keyed
    `optim.<param index>.<name>`, JSON-able param groups + non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    groups = []
    pid = 0
    for group in optimizer.param_groups:
        packed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items() if k != "params"}
        packed["params"] = list(range(pid, pid + len(group["params"])))
        groups.append(packed)
        for param in group["params"]:
            for name, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor):
                    tensors[_optim_key(pid, name)] = value
                else:
                    scalars.setdefault(str(pid), {})[name] = value
            pid += 1
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optim_key(pid: int, name: str) -> str:
    return f"{OPTIM_PREFIX}.{pid}.{name}"


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of `optimizer_state` (with the tensors loaded back from a checkpoint)."""
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
