"""A small learnable LeRobot v3 dataset for fast tests (no MuJoCo needed).

Each task has its own colour and action pattern, so a model can lower its loss within a few steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset

TASKS = ("push the red block", "open the green drawer", "press the blue button")
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def write_synthetic_dataset(root: Path, episodes_per_task: int = 2, length: int = 12, size: int = 32,
                            seed: int = 0) -> Path:
    """Write the dataset at `root` (a dataset named root.name) and return `root`."""
    rng = np.random.default_rng(seed)
    episodes = []
    for t, (task, colour) in enumerate(zip(TASKS, COLOURS)):
        for _ in range(episodes_per_task):
            images = np.tile(np.array(colour, dtype=np.uint8), (length, size, size, 1))
            images = np.clip(images.astype(np.int16) + rng.integers(-20, 20, images.shape), 0, 255).astype(np.uint8)
            phase = np.linspace(0, 1, length, dtype=np.float32)
            actions = np.stack([np.full(length, (t - 1) * 0.5), phase - 0.5, -phase + 0.2,
                                np.where(phase > 0.5, 1.0, -1.0)], axis=1).astype(np.float32)
            states = rng.normal(size=(length, 4)).astype(np.float32)
            episodes.append(Episode(images=images, states=states, actions=actions, task=task))
    return write_lerobot_dataset(root, episodes, fps=10, robot_type="synthetic")
