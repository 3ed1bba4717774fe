"""MetaWorld v3 environments, the offscreen camera and the GL backend choice, shared by the demo
data generator (`steadyvla.data.demo_metaworld`) and closed-loop evaluation (`steadyvla.eval`).

Rendering goes through `mujoco.Renderer` with shadows, reflections and multisampling off: with
software GL (osmesa) that is ~2x faster than the defaults and ~10x faster than `env.render()`.
The GL backend must be chosen before mujoco is imported; see `select_gl_backend`.
"""

from __future__ import annotations

import importlib
import os
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

# Instructions are lower-case with no final period: prompts embed them as
# "What action should the robot take to {instruction}?".
TASK_INSTRUCTIONS: dict[str, str] = {
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
DEFAULT_CAMERA = "corner4"  # close view of arm, table and objects (rendered upside down: flipped)
METAWORLD_MAX_STEPS = 500  # env.max_path_length; stepping past it raises inside MetaWorld
INSTALL_HINT = "MetaWorld and MuJoCo are needed: pip install 'steadyvla[demo]'"


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


def check_mujoco_backend(backend: str) -> None:
    """Fail early if mujoco was imported before MUJOCO_GL was chosen (the choice is then fixed)."""
    context = sys.modules.get("mujoco.gl_context")
    imported_with = getattr(context, "_MUJOCO_GL", None)
    if imported_with is None:
        return
    if (imported_with or "glfw") != backend.lower():
        raise RuntimeError(
            f"mujoco was imported with MUJOCO_GL={imported_with or '(unset: glfw)'!r} before the "
            f"MetaWorld code could select {backend!r}; set MUJOCO_GL={backend} in the environment, "
            "or call steadyvla.sim.metaworld.select_gl_backend() before importing "
            "mujoco or metaworld"
        )


def render_help(backend: str, error: BaseException) -> str:
    hints = {
        "osmesa": "install OSMesa (Debian/Ubuntu: `apt-get install libosmesa6`) and PyOpenGL",
        "egl": "install the NVIDIA EGL driver libraries (`apt-get install libegl1`), or use "
               "software rendering with MUJOCO_GL=osmesa (needs `apt-get install libosmesa6`)",
    }
    hint = hints.get(backend, "set MUJOCO_GL=osmesa (needs `apt-get install libosmesa6`) or egl")
    return (f"MuJoCo cannot render with MUJOCO_GL={backend!r} "
            f"({type(error).__name__}: {error}); {hint}")


class Camera:
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
            raise RuntimeError(render_help(backend, e)) from e

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


def episode_seed(seed: int, task: str, attempt: int, stream: int = 0) -> int:
    """A 32-bit env seed for one attempt of `task`; `stream` separates uses (demo data, eval)."""
    # Per-task streams: adding or reordering tasks leaves every other task's episodes unchanged.
    entropy = [seed, zlib.crc32(task.encode()), attempt] + ([stream] if stream else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def make_env(metaworld: Any, task: str) -> Any:
    """The goal-observable v3 env of `task`, re-drawing object/goal placement on every seeded reset."""
    env = metaworld.ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]()
    # Draw a fresh object/goal placement from env.np_random on every reset, so `env.seed(s)`
    # alone fixes an episode. (MetaWorld's MT1 does the same through 50 pre-drawn placements,
    # at ~1.4 s per task.)
    env.seeded_rand_vec = True
    env._freeze_rand_vec = False
    return env


def import_metaworld(backend: str) -> Any:
    """Import mujoco (loading the GL backend) and metaworld; missing pieces are explained."""
    # triton (imported by torch._dynamo, which torchvision, timm and transformers load lazily)
    # segfaults when loaded after mujoco's OSMesa GL (torch 2.13 + mujoco 3 here); the other order
    # is fine, so load it first.
    try:
        importlib.import_module("torch._dynamo")
    except ImportError:
        pass
    try:
        importlib.import_module("mujoco")  # loads the GL backend named by MUJOCO_GL
    except ModuleNotFoundError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e
    except Exception as e:  # a missing GL library surfaces here, as ImportError or OSError
        raise RuntimeError(render_help(backend, e)) from e
    try:
        return importlib.import_module("metaworld")
    except ModuleNotFoundError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from e


def reset_env(env: Any, seed: int) -> np.ndarray:
    """Seed and reset `env`; returns the first observation."""
    import mujoco

    env.seed(seed)
    obs, _ = env.reset()
    # reset() moves the goal marker without recomputing site positions; without this, frame 0
    # would show the marker where the previous episode (or env construction) left it.
    mujoco.mj_forward(env.model, env.data)
    return obs
