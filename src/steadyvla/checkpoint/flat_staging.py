"""A save's adapter and optimizer tensors copied to the host as one block per dtype.

The 7B LoRA state is ~3,400 small tensors (adapter A/B, AdamW's two moments and step per
parameter). Copying them one by one cost ~40 ms of Python and copy launches on the training
thread at every save. Here the live tensors are first gathered on the device into one flat buffer
per (device, dtype) with a multi-tensor copy, then each buffer goes to its pinned host twin in a
single copy. The host twins are cut into per-key views once, so a snapshot is a handful of calls,
and the views are what the writer thread saves (safetensors writes each view's bytes).

Costs device memory equal to the staged state (the estimate in memory_estimate.py counts it);
on CPU the device buffer is skipped and the tensors are copied straight into the host views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from steadyvla.checkpoint.state import pinned_buffer

# Every view starts at a multiple of this many bytes (aligned loads in the copy kernels).
ALIGN_BYTES = 128


@dataclass(frozen=True)
class _Group:
    device: torch.device
    dtype: torch.dtype
    keys: tuple[tuple[str, str], ...]  # (section, name)
    device_flat: torch.Tensor | None  # None on CPU: no gathering step
    device_views: tuple[torch.Tensor, ...]
    host_flat: torch.Tensor


Sections = dict[str, dict[str, torch.Tensor]]  # e.g. {"adapter": {...}, "optimizer": {...}}


def _flat(sections: Sections) -> dict[tuple[str, str], torch.Tensor]:
    return {(name, key): t for name, tensors in sections.items() for key, t in tensors.items()}


def _signature(tensors: dict[tuple[str, str], torch.Tensor]) -> tuple:
    return tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in tensors.items())


class FlatStaging:
    """Reserved device and pinned host buffers for a fixed set of named tensors in named sections
    (built once the optimizer has state); `copy` snapshots the current values of tensors with that
    signature, section by section."""

    def __init__(self, sections: Sections):
        tensors = _flat(sections)
        self.signature = _signature(tensors)
        self._reserved_for = tuple(tensors.values())  # identity: the cheap check at every save
        by_group: dict[tuple[torch.device, torch.dtype], list[tuple[str, str]]] = {}
        for key, t in tensors.items():
            by_group.setdefault((t.device, t.dtype), []).append(key)
        self.groups: list[_Group] = []
        self.host_views: dict[tuple[str, str], torch.Tensor] = {}
        for (device, dtype), keys in by_group.items():
            self.groups.append(self._reserve(device, dtype, keys, tensors))
        self._sections = {name: {key: self.host_views[(name, key)] for key in part} for name, part in sections.items()}

    def _reserve(self, device: torch.device, dtype: torch.dtype, keys: list[tuple[str, str]],
                 tensors: dict[tuple[str, str], torch.Tensor]) -> _Group:
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
        offsets, total = [], 0
        for key in keys:
            offsets.append(total)
            total += -(-tensors[key].numel() // align) * align
        host_flat = pinned_buffer(f"flat.{device}.{dtype}", torch.empty(total, dtype=dtype, device="meta"))
        device_flat = torch.empty(total, dtype=dtype, device=device) if device.type != "cpu" else None
        device_views = []
        for key, start in zip(keys, offsets):
            shape, n = tensors[key].shape, tensors[key].numel()
            self.host_views[key] = host_flat[start:start + n].view(shape)
            if device_flat is not None:
                device_views.append(device_flat[start:start + n].view(shape))
        return _Group(device, dtype, tuple(keys), device_flat, tuple(device_views), host_flat)

    def matches(self, sections: Sections) -> bool:
        """Whether `sections` has the keys, shapes, dtypes and devices the buffers were reserved for."""
        live = [t for part in sections.values() for t in part.values()]
        if len(live) == len(self._reserved_for) and all(a is b for a, b in zip(live, self._reserved_for)):
            return True  # the very tensors (optimizers update their state in place): same keys unless renamed
        return _signature(_flat(sections)) == self.signature

    def copy(self, sections: Sections) -> Sections:
        """Copy `sections` (matching the signature) into the host views and return them per section
        (new dicts). On CUDA the copies are issued on the current stream without waiting: call it
        inside a `DeviceCopies` block, and read the views only after that block's `wait()`."""
        with torch.no_grad():
            for group in self.groups:
                sources = [sections[name][key] for name, key in group.keys]
                if group.device_flat is None:
                    torch._foreach_copy_([self.host_views[key] for key in group.keys], sources)
                    continue
                torch._foreach_copy_(list(group.device_views), sources)  # one multi-tensor kernel per chunk
                group.host_flat.copy_(group.device_flat, non_blocking=True)
        return {name: dict(views) for name, views in self._sections.items()}

    @property
    def device_bytes(self) -> int:
        """Device memory the gathering buffers hold."""
        return sum(g.device_flat.numel() * g.device_flat.element_size() for g in self.groups
                   if g.device_flat is not None)
