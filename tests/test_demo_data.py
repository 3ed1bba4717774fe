"""The MetaWorld demo dataset: valid LeRobot output, determinism, reuse, and clear failures."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from steadyvla.data import demo_metaworld as demo
from steadyvla.data.lerobot import LeRobotFrames, is_lerobot_dataset

# Nothing may import mujoco before the generator picks MUJOCO_GL, so probe without importing.
if importlib.util.find_spec("metaworld") is None:
    pytest.skip("MetaWorld is not installed (pip install 'steadyvla[demo]')",
                allow_module_level=True)

# Two experts that succeed in ~20-45 steps keep this file fast; 32 px renders in ~10 ms.
TINY = {"tasks": ["handle-press-v3", "coffee-button-v3"], "episodes_per_task": 1,
        "image_size": 32, "max_episode_steps": 60, "seed": 0, "progress": False}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return demo.generate_demo_dataset(tmp_path_factory.mktemp("demo") / "metaworld_demo", **TINY)


def test_demo_tasks_are_valid():
    from metaworld.policies import ENV_POLICY_MAP

    assert len(demo.DEMO_TASKS) >= 5
    assert set(demo.DEFAULT_TASKS) <= set(demo.DEMO_TASKS)
    for name, sentence in demo.DEMO_TASKS.items():
        assert name in ENV_POLICY_MAP and name.endswith("-v3")
        assert sentence == sentence.lower().strip() and not sentence.endswith(".")
    assert len(set(demo.DEMO_TASKS.values())) == len(demo.DEMO_TASKS)


def test_tiny_dataset_contents(tiny_dataset):
    assert is_lerobot_dataset(tiny_dataset)
    reader = LeRobotFrames(tiny_dataset)
    assert reader.num_episodes == 2 and reader.fps == demo.FPS
    assert reader.instructions == [demo.DEMO_TASKS["handle-press-v3"],
                                   demo.DEMO_TASKS["coffee-button-v3"]]
    info = json.loads((tiny_dataset / "meta" / "info.json").read_text())
    assert info["robot_type"] == "sawyer"
    assert info["features"]["observation.image"]["shape"] == [32, 32, 3]
    assert info["features"]["observation.state"]["names"] == demo.STATE_NAMES
    assert info["features"]["action"]["shape"] == [4]
    actions = reader.actions()
    assert actions.shape == (len(reader), 4) and np.abs(actions).max() <= 1.0
    assert info["total_frames"] == len(reader) <= 2 * TINY["max_episode_steps"]
    first, last = reader.frame(0), reader.frame(len(reader) - 1)
    assert first.image.shape == (32, 32, 3) and first.image.std() > 5  # a real picture, not blank
    assert (first.episode_index, last.episode_index) == (0, 1)
    meta = json.loads((tiny_dataset / "meta" / "steadyvla.json").read_text())
    assert meta["params"]["tasks"] == TINY["tasks"] and meta["params"]["camera"] == "corner4"


def test_same_arguments_same_frames(tiny_dataset, tmp_path):
    again = demo.generate_demo_dataset(tmp_path / "again", **TINY)
    a, b = LeRobotFrames(tiny_dataset), LeRobotFrames(again)
    assert len(a) == len(b)
    np.testing.assert_array_equal(a.actions(), b.actions())
    for i in range(len(a)):
        fa, fb = a.frame(i), b.frame(i)
        np.testing.assert_array_equal(fa.image, fb.image)
        assert (fa.instruction, fa.episode_index, fa.frame_index) == (
            fb.instruction, fb.episode_index, fb.frame_index)


def test_ensure_reuses_a_complete_dataset(tiny_dataset, capsys):
    info = tiny_dataset / "meta" / "info.json"
    before = info.stat().st_mtime_ns
    assert demo.ensure_demo_dataset(tiny_dataset, **TINY) == tiny_dataset
    assert "Reusing the demo dataset" in capsys.readouterr().out
    assert info.stat().st_mtime_ns == before


def test_ensure_regenerates_when_settings_changed(tiny_dataset, tmp_path, capsys):
    copy = tmp_path / "metaworld_demo"
    shutil.copytree(tiny_dataset, copy)
    changed = {**TINY, "tasks": ["handle-press-v3"]}
    demo.ensure_demo_dataset(copy, **changed)
    assert "made with other settings; regenerating" in capsys.readouterr().out
    assert LeRobotFrames(copy).num_episodes == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metaworld_demo"]


def test_task_that_never_succeeds_fails_clearly(tmp_path):
    args = {**TINY, "tasks": ["coffee-button-v3"], "max_episode_steps": 3}
    match = r"'coffee-button-v3'.*0 of 5 attempts.*max_episode_steps=3"
    with pytest.raises(RuntimeError, match=match):
        demo.generate_demo_dataset(tmp_path / "never", **args)
    assert list(tmp_path.iterdir()) == []  # no half-written dataset


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tasks": ["fly-v3"]}, r"bad: \['fly-v3'\]; valid: \["),
        ({"episodes_per_task": 0}, "episodes_per_task must be >= 1"),
        ({"max_episode_steps": 501}, r"max_episode_steps must be in \[1, 500\]"),
        ({"image_size": 4}, r"image_size must be in \[8, 1024\]"),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.generate_demo_dataset(tmp_path / "x", **kwargs)


def test_gl_backend_respects_the_user(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "glfw")
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    assert demo.select_gl_backend() == "glfw"
    assert "PYOPENGL_PLATFORM" not in os.environ
    monkeypatch.delenv("MUJOCO_GL")
    expected = "egl" if os.path.exists("/dev/nvidia0") else "osmesa"
    assert demo.select_gl_backend() == expected
    assert os.environ["PYOPENGL_PLATFORM"] == expected


def test_render_failure_says_what_to_install():
    message = demo._render_help("osmesa", OSError("libOSMesa.so: cannot open"))
    assert "apt-get install libosmesa6" in message and "libOSMesa.so" in message


def test_mujoco_imported_with_another_backend_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setitem(sys.modules, "mujoco.gl_context", types.SimpleNamespace(_MUJOCO_GL=""))
    match = r"imported with MUJOCO_GL='\(unset: glfw\)'.*MUJOCO_GL=osmesa"
    with pytest.raises(RuntimeError, match=match):
        demo.generate_demo_dataset(tmp_path / "x", **TINY)


def test_first_frame_shows_the_reset_state():
    import metaworld
    import mujoco
    from metaworld.policies import ENV_POLICY_MAP

    class Probe:  # stands in for the camera: records what the renderer would draw
        def __init__(self):
            self.sites = []

        def render(self, data):
            self.sites.append(data.site_xpos.copy())
            return np.zeros((8, 8, 3), np.uint8)

    env = demo._make_env(metaworld, "reach-v3")
    probe = Probe()
    demo._rollout(env, ENV_POLICY_MAP["reach-v3"](), probe, "reach-v3", max_steps=2, seed=11)
    env.seed(11)
    env.reset()
    mujoco.mj_forward(env.model, env.data)
    # The goal marker must be drawn where this episode's goal is, not where the last one was.
    np.testing.assert_array_equal(probe.sites[0], env.data.site_xpos)
    env.close()
