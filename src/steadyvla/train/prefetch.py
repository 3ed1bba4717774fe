"""The next batch's host-to-GPU copy on a side stream, overlapping the current step's compute.

The DataLoader pins each batch; copied with `non_blocking` on the compute stream, the copy still
runs between the end of one step's kernels and the start of the next step's (the 7B's batch of 16
carries 19 MB of pixels: about a millisecond of an idle device per step). Here batch N+1 is copied on
a copy stream while step N computes, and step N+1's kernels wait only for that copy (a stream event).
What the model sees is the same tensors, bit for bit: nothing about the data position changes (the
loader's sampler is infinite, and the batch taken one step early is the one the next step uses).
"""

from __future__ import annotations

from typing import Iterator

import torch

Batch = dict[str, torch.Tensor]


class DevicePrefetcher:
    """Wraps a batch iterator; each batch's `keys` come out already on `device` (a CUDA device),
    and the batch after it is on its way while the caller computes."""

    def __init__(self, batches: Iterator[Batch], device: torch.device, keys: tuple[str, ...]):
        self.batches, self.device, self.keys = batches, device, keys
        self.stream = torch.cuda.Stream(device)
        self.ahead: tuple[Batch, torch.cuda.Event] | None = None
        self.exhausted = False

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def _start_next(self) -> None:
        """Take the next batch from the wrapped iterator and start its copy on the side stream."""
        try:
            batch = next(self.batches)
        except StopIteration:
            self.ahead, self.exhausted = None, True
            return
        with torch.cuda.stream(self.stream):
            moved = {k: (v.to(self.device, non_blocking=True) if k in self.keys else v) for k, v in batch.items()}
            copied = torch.cuda.Event()
            copied.record(self.stream)
        self.ahead = (moved, copied)

    def __next__(self) -> Batch:
        if self.ahead is None and not self.exhausted:
            self._start_next()
        if self.ahead is None:
            raise StopIteration
        batch, copied = self.ahead
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for key in self.keys:
            if key in batch:
                # its memory must not return to the side stream's pool before the compute stream is done
                batch[key].record_stream(compute)
        self._start_next()
        return batch


def prefetched(batches: Iterator[Batch], device: torch.device, keys: tuple[str, ...]) -> Iterator[Batch]:
    """`batches` with the model inputs `keys` copied ahead to `device` on a side stream (CUDA), or
    `batches` unchanged (CPU: there is no copy to overlap)."""
    return DevicePrefetcher(batches, device, keys) if device.type == "cuda" else batches
