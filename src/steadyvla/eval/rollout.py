"""Closed-loop MetaWorld rollouts with a pluggable action source, batched across environments.

The action source is any callable `(images, instructions, states) -> actions [B, A]`: the VLA
(`eval.policy.vla_action_source`) uses the images and instructions, a scripted expert the states.
Episodes of one task run in waves of `num_envs` environments stepped in lockstep, so the model
sees one batch per step for all live environments. An episode ends at the first success (its
length is the number of steps taken) or at `max_steps`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from steadyvla.sim.metaworld import (DEFAULT_CAMERA, TASK_INSTRUCTIONS, Camera, episode_seed,
                                     import_metaworld, make_env, reset_env, select_gl_backend)

ActionSource = Callable[[list[np.ndarray], list[str], list[np.ndarray]], np.ndarray]
EVAL_SEED_STREAM = 1  # env placements differ from the demo data's (stream 0) for the same seed


@dataclass
class EpisodeResult:
    """One evaluation episode: its env seed, whether it succeeded, and the steps it took."""

    task: str
    index: int
    env_seed: int
    success: bool
    length: int
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # only for recorded ones


@dataclass
class _Slot:
    env: object
    camera: Camera
    episode: EpisodeResult | None = None
    obs: np.ndarray | None = None
    running: bool = False


def _step_wave(slots: list[_Slot], task: str, source: ActionSource, max_steps: int, record: int,
               on_done: Callable[[EpisodeResult], None]) -> None:
    instruction = TASK_INSTRUCTIONS[task]
    for step in range(max_steps):
        live = [s for s in slots if s.running]
        if not live:
            return
        images = [s.camera.render(s.env.data) for s in live]
        for slot, image in zip(live, images):
            if slot.episode.index < record:
                slot.episode.frames.append(image)
        actions = np.asarray(source(images, [instruction] * len(live), [s.obs for s in live]))
        dims = live[0].env.action_space.shape[0]
        if actions.shape != (len(live), dims):
            raise ValueError(f"the action source returned shape {actions.shape} for {len(live)} "
                             f"environments; MetaWorld needs [{len(live)}, {dims}]")
        for slot, action in zip(live, actions):
            slot.obs, _, _, truncated, info = slot.env.step(np.clip(action, -1.0, 1.0).astype(np.float32))
            slot.episode.length = step + 1
            if info["success"] or truncated:
                slot.episode.success = bool(info["success"])
                slot.running = False
                on_done(slot.episode)
    for slot in slots:  # the horizon ended the rest
        if slot.running:
            slot.running = False
            on_done(slot.episode)


def rollout_task(task: str, source: ActionSource, *, episodes: int, seed: int, max_steps: int,
                 image_size: int, num_envs: int = 8, record: int = 0, camera: str = DEFAULT_CAMERA,
                 on_episode: Callable[[EpisodeResult], None] | None = None) -> list[EpisodeResult]:
    """Run `episodes` closed-loop episodes of `task`; frames are kept for the first `record`.

    Episode i resets to `episode_seed(seed, task, i, EVAL_SEED_STREAM)`, so results do not depend
    on `num_envs` or on which other tasks are evaluated.
    """
    backend = select_gl_backend()
    metaworld = import_metaworld(backend)
    slots = []
    try:
        for _ in range(min(num_envs, episodes)):
            env = make_env(metaworld, task)
            slots.append(_Slot(env, Camera(env.model, image_size, camera, backend)))
        results: list[EpisodeResult] = []
        for start in range(0, episodes, len(slots)):
            for slot, index in zip(slots, range(start, min(start + len(slots), episodes))):
                env_seed = episode_seed(seed, task, index, EVAL_SEED_STREAM)
                slot.episode = EpisodeResult(task, index, env_seed, success=False, length=0)
                slot.obs = reset_env(slot.env, env_seed)
                slot.running = True
            wave = [s for s in slots if s.running]
            _step_wave(wave, task, source, max_steps, record, on_episode or (lambda _e: None))
            results.extend(s.episode for s in wave)
            for slot in slots:
                slot.episode, slot.running = None, False
        return results
    finally:
        for slot in slots:
            slot.camera.close()
            slot.env.close()


def expert_action_source(task: str) -> ActionSource:
    """MetaWorld's scripted expert for `task` as an action source (reads the states only)."""
    import warnings

    import_metaworld(select_gl_backend())
    from metaworld.policies import ENV_POLICY_MAP

    policy = ENV_POLICY_MAP[task]()

    def act(images: Sequence[np.ndarray], instructions: Sequence[str],
            states: Sequence[np.ndarray]) -> np.ndarray:
        with warnings.catch_warnings():  # experts warn that their own gains exceed [-1, 1]
            warnings.simplefilter("ignore", UserWarning)
            return np.stack([policy.get_action(s) for s in states])

    return act
