"""The one interface every dataset reader implements: random access to frames.

Readers (LeRobot v3, RLDS, the MetaWorld demo) return `Frame`s by global index so that the
sampler, not the reader, decides the order. That is what makes the data position resumable and
keeps host memory bounded: no reader holds a shuffle buffer of decoded frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Frame:
    """One training sample: an RGB image, the action taken, and the instruction."""

    image: np.ndarray  # [H, W, 3] uint8 RGB
    action: np.ndarray  # [A] float32, unnormalized (as recorded)
    instruction: str
    episode_index: int
    frame_index: int


class FrameSource(Protocol):
    """Random-access view of a dataset's frames (all episodes concatenated)."""

    name: str

    def __len__(self) -> int: ...

    def frame(self, index: int) -> Frame: ...

    def actions(self) -> np.ndarray:
        """All actions as [num_frames, A] float32 (for statistics); no images decoded."""
        ...

    @property
    def num_episodes(self) -> int: ...
