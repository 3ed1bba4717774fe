"""OpenVLA's action discretisation: 256 uniform bins over [-1, 1] mapped onto the LAST 256 ids.

Encoding: token = vocab_end - digitize(clip(a, -1, 1), linspace(-1, 1, n_bins)).
Decoding: index = clip(vocab_end - token - 1, 0, n_bins - 2) -> one of the n_bins - 1 bin centers.
`vocab_end` is the tokenizer's vocabulary size without the appended <PAD> (32000 for Llama-2).
"""

from __future__ import annotations

import numpy as np
import torch


class ActionTokenizer:
    """Maps normalized continuous actions to token ids and back (bin-center decoding)."""

    def __init__(self, vocab_end: int, n_bins: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        if vocab_end <= n_bins:
            raise ValueError(f"vocab_end={vocab_end} must exceed n_bins={n_bins}")
        self.vocab_end = vocab_end
        self.n_bins = n_bins
        self.min_action = min_action
        self.max_action = max_action
        self.bins = np.linspace(min_action, max_action, n_bins)
        self.bin_centers = (self.bins[:-1] + self.bins[1:]) / 2.0
        self._device_centers: dict[torch.device, torch.Tensor] = {}

    def _centers_on(self, device: torch.device) -> torch.Tensor:
        # cached: a pageable host-to-device copy per step would make the host wait for the device
        if device not in self._device_centers:
            self._device_centers[device] = torch.as_tensor(self.bin_centers, dtype=torch.float32, device=device)
        return self._device_centers[device]

    @property
    def first_action_id(self) -> int:
        """Smallest token id an action can map to (vocab_end - n_bins)."""
        return self.vocab_end - self.n_bins

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Normalized actions [..., A] -> token ids [..., A] (int64)."""
        clipped = np.clip(np.asarray(actions, dtype=np.float64), self.min_action, self.max_action)
        return (self.vocab_end - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """Token ids -> normalized actions at bin centers (float32)."""
        ids = token_ids.cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        index = np.clip(self.vocab_end - ids - 1, 0, self.bin_centers.shape[0] - 1)
        return self.bin_centers[index].astype(np.float32)

    def decode_torch(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Like `decode` but stays on the tensor's device (used in the training metrics)."""
        centers = self._centers_on(token_ids.device)
        index = (self.vocab_end - token_ids - 1).clamp(0, centers.shape[0] - 1)
        return centers[index]

    def is_action_token(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of ids inside the action range."""
        return (token_ids >= self.first_action_id) & (token_ids < self.vocab_end)
