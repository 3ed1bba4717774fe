"""The embedded demo dataset: MetaWorld v3 scripted-expert episodes written as LeRobot v3.0.

MetaWorld ships 50 scripted expert policies (`metaworld.policies`) and no instructions, so each
demo task gets one sentence here. Each attempt resets the environment to a seeded random
object/goal placement; only successful episodes are kept, and each stops a few steps after
success. Same arguments -> same actions, states and (on one GL backend) pixels.
Environments, the camera and the GL backend choice live in `steadyvla.sim.metaworld` (shared
with closed-loop evaluation).
"""

from __future__ import annotations

import inspect
import json
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.data.lerobot import is_lerobot_dataset
from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset
from steadyvla.sim.metaworld import (DEFAULT_CAMERA, METAWORLD_MAX_STEPS, TASK_INSTRUCTIONS, Camera,
                                     check_mujoco_backend, episode_seed, import_metaworld, make_env,
                                     render_help, reset_env, select_gl_backend)

DEMO_TASKS: dict[str, str] = TASK_INSTRUCTIONS
DEFAULT_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "button-press-topdown-v3", "drawer-open-v3")
FPS = 80  # MetaWorld control rate: 5 physics substeps of 2.5 ms per env step
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_distance"]
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
STEPS_AFTER_SUCCESS = 3
_METAWORLD_MAX_STEPS = METAWORLD_MAX_STEPS
_GENERATOR = "steadyvla.data.demo_metaworld"


# Older names, kept for callers and tests of this module.
_check_mujoco_backend = check_mujoco_backend
_render_help = render_help
_Camera = Camera
_make_env = make_env
_episode_seed = episode_seed


def _rollout(env: Any, policy: Any, camera: Camera, task: str, max_steps: int,
             seed: int) -> Episode | None:
    obs = reset_env(env, seed)
    images, states, actions = [], [], []
    success_at = None
    for step in range(max_steps):
        images.append(camera.render(env.data))
        states.append(obs[:4])
        with warnings.catch_warnings():  # experts warn that their own gains exceed [-1, 1]
            warnings.simplefilter("ignore", UserWarning)
            raw = policy.get_action(obs)
        action = np.clip(raw, -1.0, 1.0).astype(np.float32)
        actions.append(action)
        obs, _, _, truncated, info = env.step(action)
        if success_at is None and info["success"]:
            success_at = step
        if truncated or (success_at is not None and step - success_at >= STEPS_AFTER_SUCCESS):
            break
    if success_at is None:
        return None
    return Episode(images=np.stack(images), states=np.asarray(states, dtype=np.float32),
                   actions=np.stack(actions), task=DEMO_TASKS[task])


def _episodes(tasks: Sequence[str], episodes_per_task: int, image_size: int, seed: int,
              max_steps: int, camera_name: str, backend: str, progress: bool) -> Iterator[Episode]:
    metaworld = import_metaworld(backend)
    from metaworld.policies import ENV_POLICY_MAP
    from tqdm import tqdm

    max_attempts = 2 * episodes_per_task + 3
    bar = tqdm(total=len(tasks) * episodes_per_task, unit="episode", disable=not progress,
               desc="MetaWorld demo")
    try:
        for task in tasks:
            env = make_env(metaworld, task)
            policy = ENV_POLICY_MAP[task]()
            camera = Camera(env.model, image_size, camera_name, backend)
            kept = attempts = 0
            try:
                while kept < episodes_per_task:
                    if attempts == max_attempts:
                        raise RuntimeError(
                            f"MetaWorld task {task!r}: the scripted expert succeeded in only "
                            f"{kept} of {attempts} attempts within max_episode_steps={max_steps}; "
                            "raise max_episode_steps or leave this task out"
                        )
                    env_seed = episode_seed(seed, task, attempts)
                    attempts += 1
                    episode = _rollout(env, policy, camera, task, max_steps, env_seed)
                    if episode is not None:
                        kept += 1
                        bar.set_postfix(task=task, frames=len(episode.actions))
                        bar.update(1)
                        yield episode
            finally:
                camera.close()
                env.close()
    finally:
        bar.close()


def _demo_params(tasks: Sequence[str] | None, episodes_per_task: int, image_size: int,
                 seed: int, max_episode_steps: int, camera: str) -> dict[str, Any]:
    tasks = list(DEFAULT_TASKS if tasks is None else tasks)
    unknown = [t for t in tasks if t not in DEMO_TASKS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(
            f"tasks must be distinct names from DEMO_TASKS; bad: {unknown or tasks}; "
            f"valid: {sorted(DEMO_TASKS)}")
    if episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [8, 1024] pixels, got {image_size}")
    if not 1 <= max_episode_steps <= _METAWORLD_MAX_STEPS:
        raise ValueError(
            f"max_episode_steps must be in [1, {_METAWORLD_MAX_STEPS}], got {max_episode_steps}")
    return {"tasks": tasks, "episodes_per_task": int(episodes_per_task),
            "image_size": int(image_size), "seed": int(seed),
            "max_episode_steps": int(max_episode_steps), "camera": camera}


def generate_demo_dataset(
    out_dir: Path,
    *,
    tasks: Sequence[str] | None = None,
    episodes_per_task: int = 4,
    image_size: int = 224,
    seed: int = 0,
    max_episode_steps: int = 150,
    camera: str = DEFAULT_CAMERA,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Roll out MetaWorld's scripted experts and write a LeRobot v3.0 dataset at `out_dir`.

    Keeps `episodes_per_task` successful episodes per task (failed rollouts are retried on the
    next seeded variation, a bounded number of times). Images are square `image_size` RGB from
    `camera`; states are hand xyz + gripper opening (obs[:4]); actions are the expert's 4-d
    actions clipped to [-1, 1]. The dataset appears atomically when complete.
    """
    params = _demo_params(tasks, episodes_per_task, image_size, seed, max_episode_steps, camera)
    backend = select_gl_backend()
    check_mujoco_backend(backend)
    episodes = _episodes(params["tasks"], params["episodes_per_task"], params["image_size"],
                         params["seed"], params["max_episode_steps"], camera, backend, progress)
    from importlib.metadata import version

    extra = {"generator": _GENERATOR, "params": params, "gl_backend": backend,
             "versions": {p: version(p) for p in ("metaworld", "mujoco")}}
    return write_lerobot_dataset(Path(out_dir), episodes, fps=FPS, robot_type="sawyer",
                                 state_names=STATE_NAMES, action_names=ACTION_NAMES,
                                 extra_meta=extra, overwrite=overwrite)


def _demo_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads((path / "meta" / "steadyvla.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def ensure_demo_dataset(out_dir: Path, **kwargs: Any) -> Path:
    """Reuse the demo dataset at `out_dir` if it is complete and made with the same settings;
    otherwise generate it (replacing an older demo dataset). Arguments as `generate_demo_dataset`.
    """
    out_dir = Path(out_dir)
    kwargs.pop("overwrite", None)
    signature = inspect.signature(generate_demo_dataset).parameters
    unknown = sorted(set(kwargs) - set(signature) | ({"out_dir"} & set(kwargs)))
    if unknown:
        valid = [n for n in signature if n != "out_dir"]
        raise TypeError(f"unknown demo dataset options {unknown}; valid: {valid}")
    names = ("tasks", "episodes_per_task", "image_size", "seed", "max_episode_steps", "camera")
    params = _demo_params(*(kwargs.get(n, signature[n].default) for n in names))
    overwrite = False
    if is_lerobot_dataset(out_dir):
        meta = _demo_meta(out_dir)
        if meta is None:
            raise FileExistsError(
                f"{out_dir} holds a LeRobot dataset not made by the demo generator; "
                "pick another directory for the demo dataset")
        if meta["params"] == params:
            print(f"Reusing the demo dataset at {out_dir} (same settings; delete it to regenerate)")
            return out_dir
        print(f"The demo dataset at {out_dir} was made with other settings; regenerating it")
        overwrite = True
    try:
        return generate_demo_dataset(out_dir, overwrite=overwrite, **kwargs)
    except FileExistsError:
        # Another process (e.g. a second rank) finished the same dataset first.
        meta = _demo_meta(out_dir) if is_lerobot_dataset(out_dir) else None
        if meta is not None and meta["params"] == params:
            print(f"Reusing the demo dataset at {out_dir} (written by another process)")
            return out_dir
        raise
