"""The embedded demo dataset: MetaWorld v3 scripted-expert episodes written as LeRobot v3.0.

MetaWorld ships 50 scripted expert policies (`metaworld.policies`) and no instructions, so each
demo task gets one sentence here. Each attempt resets the environment to a seeded random
object/goal placement; only successful episodes are kept, and each stops a few steps after
success. Same arguments -> same actions, states and (on one GL backend) pixels.

Rendering goes through `mujoco.Renderer` with shadows, reflections and multisampling off: with
software GL (osmesa) that is ~2x faster than the defaults and ~10x faster than `env.render()`.
The GL backend must be chosen before mujoco is imported; see `select_gl_backend`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import sys
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from steadyvla.data.lerobot import is_lerobot_dataset
from steadyvla.data.lerobot_writer import Episode, write_lerobot_dataset

# Instructions are lower-case with no final period: prompts embed them as
# "What action should the robot take to {instruction}?".
DEMO_TASKS: dict[str, str] = {
    "reach-v3": "reach the red goal position",
    "push-v3": "push the red puck to the green goal",
    "pick-place-v3": "pick up the red puck and place it at the blue goal",
    "button-press-topdown-v3": "press the red button down from the top",
    "drawer-open-v3": "pull the green drawer open",
    "drawer-close-v3": "push the green drawer closed",
    "button-press-v3": "press the button on the wall",
    "coffee-button-v3": "press the button on the coffee machine",
    "handle-press-v3": "press the handle down",
    "plate-slide-v3": "slide the plate into the goal",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
DEFAULT_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "button-press-topdown-v3", "drawer-open-v3")
DEFAULT_CAMERA = "corner4"  # close view of arm, table and objects (rendered upside down: flipped)
FPS = 80  # MetaWorld control rate: 5 physics substeps of 2.5 ms per env step
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_distance"]
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper"]
STEPS_AFTER_SUCCESS = 3
_METAWORLD_MAX_STEPS = 500  # env.max_path_length; stepping past it raises inside MetaWorld
_GENERATOR = "steadyvla.data.demo_metaworld"


def select_gl_backend() -> str:
    """Pick MuJoCo's GL backend before mujoco is imported; returns the backend name.

    A user's MUJOCO_GL is kept. Otherwise "egl" (GPU, fast) when /dev/nvidia0 exists, else
    "osmesa" (software). PYOPENGL_PLATFORM is set to match unless the user set it.
    """
    backend = os.environ.get("MUJOCO_GL") or ("egl" if Path("/dev/nvidia0").exists() else "osmesa")
    os.environ["MUJOCO_GL"] = backend
    if backend in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", backend)
    return backend


# At import too: whatever imports this module before mujoco (the CLI, an eval script) gets a
# backend that works here; the user's MUJOCO_GL always wins.
select_gl_backend()


def _check_mujoco_backend(backend: str) -> None:
    """Fail early if mujoco was imported before MUJOCO_GL was chosen (the choice is then fixed)."""
    context = sys.modules.get("mujoco.gl_context")
    imported_with = getattr(context, "_MUJOCO_GL", None)
    if imported_with is None:
        return
    if (imported_with or "glfw") != backend.lower():
        raise RuntimeError(
            f"mujoco was imported with MUJOCO_GL={imported_with or '(unset: glfw)'!r} before the "
            f"demo generator could select {backend!r}; set MUJOCO_GL={backend} in the environment, "
            "or call steadyvla.data.demo_metaworld.select_gl_backend() before importing "
            "mujoco or metaworld"
        )


def _render_help(backend: str, error: BaseException) -> str:
    hints = {
        "osmesa": "install OSMesa (Debian/Ubuntu: `apt-get install libosmesa6`) and PyOpenGL",
        "egl": "install the NVIDIA EGL driver libraries (`apt-get install libegl1`), or use "
               "software rendering with MUJOCO_GL=osmesa (needs `apt-get install libosmesa6`)",
    }
    hint = hints.get(backend, "set MUJOCO_GL=osmesa (needs `apt-get install libosmesa6`) or egl")
    return (f"MuJoCo cannot render with MUJOCO_GL={backend!r} "
            f"({type(error).__name__}: {error}); {hint}")


class _Camera:
    """One offscreen renderer bound to a model; returns upright [size, size, 3] uint8 frames."""

    def __init__(self, model: Any, size: int, camera: str, backend: str):
        import mujoco

        self._mujoco = mujoco
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        if camera not in names:
            raise ValueError(f"camera {camera!r} is not in the MetaWorld scene; valid: {names}")
        self._camera = camera
        self._flip = camera.startswith("corner")
        model.vis.quality.offsamples = 0  # no MSAA: halves software-GL time, visual-only setting
        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as e:  # the GL stack fails in many library-specific ways
            raise RuntimeError(_render_help(backend, e)) from e

    def render(self, data: Any) -> np.ndarray:
        flags = self._mujoco.mjtRndFlag
        self._renderer.update_scene(data, camera=self._camera)
        self._renderer.scene.flags[flags.mjRND_SHADOW] = False
        self._renderer.scene.flags[flags.mjRND_REFLECTION] = False
        image = self._renderer.render()
        # A 180-degree turn (not a mirror) is what an upright camera at that spot would see.
        return np.ascontiguousarray(image[::-1, ::-1] if self._flip else image)

    def close(self) -> None:
        self._renderer.close()


def _episode_seed(seed: int, task: str, attempt: int) -> int:
    # Per-task streams: adding or reordering tasks leaves every other task's episodes unchanged.
    entropy = [seed, zlib.crc32(task.encode()), attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _make_env(metaworld: Any, task: str) -> Any:
    env = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]()
    # Draw a fresh object/goal placement from env.np_random on every reset, so `env.seed(s)`
    # alone fixes an episode. (MetaWorld's MT1 does the same through 50 pre-drawn placements,
    # at ~1.4 s per task.)
    env.seeded_rand_vec = True
    env._freeze_rand_vec = False
    return env


def _rollout(env: Any, policy: Any, camera: _Camera, task: str, max_steps: int,
             seed: int) -> Episode | None:
    import mujoco

    env.seed(seed)
    obs, _ = env.reset()
    # reset() moves the goal marker without recomputing site positions; without this, frame 0
    # would show the marker where the previous episode (or env construction) left it.
    mujoco.mj_forward(env.model, env.data)
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
    install = "the demo dataset needs MetaWorld and MuJoCo: pip install 'steadyvla[demo]'"
    try:
        importlib.import_module("mujoco")  # loads the GL backend named by MUJOCO_GL
    except ModuleNotFoundError as e:
        raise ImportError(f"{install} ({e})") from e
    except Exception as e:  # a missing GL library surfaces here, as ImportError or OSError
        raise RuntimeError(_render_help(backend, e)) from e
    try:
        import metaworld
        from metaworld.policies import ENV_POLICY_MAP
    except ModuleNotFoundError as e:
        raise ImportError(f"{install} ({e})") from e
    from tqdm import tqdm

    max_attempts = 2 * episodes_per_task + 3
    bar = tqdm(total=len(tasks) * episodes_per_task, unit="episode", disable=not progress,
               desc="MetaWorld demo")
    try:
        for task in tasks:
            env = _make_env(metaworld, task)
            policy = ENV_POLICY_MAP[task]()
            camera = _Camera(env.model, image_size, camera_name, backend)
            kept = attempts = 0
            try:
                while kept < episodes_per_task:
                    if attempts == max_attempts:
                        raise RuntimeError(
                            f"MetaWorld task {task!r}: the scripted expert succeeded in only "
                            f"{kept} of {attempts} attempts within max_episode_steps={max_steps}; "
                            "raise max_episode_steps or leave this task out"
                        )
                    episode_seed = _episode_seed(seed, task, attempts)
                    attempts += 1
                    episode = _rollout(env, policy, camera, task, max_steps, episode_seed)
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
    _check_mujoco_backend(backend)
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
