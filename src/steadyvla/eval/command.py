"""`steadyvla eval`: check every flag, load the model, roll out each task, write the results.

Bad input (unknown task, missing checkpoint or statistics, a non-positive count) is one
`ConfigError` naming the flag, raised before anything is loaded or written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steadyvla.config import ConfigError
from steadyvla.eval.report import build_report, default_results_path, format_summary, write_report
from steadyvla.eval.rollout import ActionSource, EpisodeResult, rollout_task
from steadyvla.sim.metaworld import DEFAULT_CAMERA, METAWORLD_MAX_STEPS, TASK_INSTRUCTIONS

DEFAULT_IMAGE_SIZE = 224  # the demo data's default (`demo_image_size`)
METAWORLD_ACTION_DIMS = 4
VIDEO_FPS = 30
VIDEO_DIR_SUFFIX = "-videos"  # videos of eval/step-000100.json go to eval/step-000100-videos/


@dataclass
class EvalRequest:
    """The flags of one `steadyvla eval` call."""

    tasks: list[str]
    episodes: int
    seed: int = 0
    checkpoint: Path | None = None
    vla_path: Path | None = None
    unnorm_key: str | None = None
    max_steps: int = 150
    videos: int = 0
    out: Path | None = None
    image_size: int | None = None
    num_envs: int = 8
    device: str = "cpu"
    progress: bool = True


def parse_tasks(text: str) -> list[str]:
    """`reach-v3,push-v3` -> a list of known, distinct task names."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_INSTRUCTIONS]
    if not tasks or unknown or len(set(tasks)) != len(tasks):
        what = f"unknown {unknown}" if unknown else f"{text!r} (empty or repeated)"
        raise ConfigError(f"--tasks: {what}; valid: comma-separated distinct names from "
                          f"{', '.join(TASK_INSTRUCTIONS)}")
    return tasks


def check_request(req: EvalRequest, needs_model: bool = True) -> None:
    """Range checks that need no files (`needs_model` False: an injected action source)."""
    for flag, value, low in (("--episodes", req.episodes, 1), ("--num-envs", req.num_envs, 1),
                             ("--videos", req.videos, 0)):
        if value < low:
            raise ConfigError(f"{flag}: {value}; must be >= {low}")
    if not 1 <= req.max_steps <= METAWORLD_MAX_STEPS:
        raise ConfigError(f"--max-steps: {req.max_steps}; must be in [1, {METAWORLD_MAX_STEPS}]")
    if req.image_size is not None and not 8 <= req.image_size <= 1024:
        raise ConfigError(f"--image-size: {req.image_size}; must be in [8, 1024] pixels")
    if needs_model and req.checkpoint is None and req.vla_path is None:
        raise ConfigError("--checkpoint: required (a checkpoint dir or a run dir), or --vla_path DIR alone "
                          "to evaluate a plain OpenVLA directory")
    if req.checkpoint is None and req.out is None:
        if not needs_model:
            raise ConfigError("--out: required when an action source replaces the model")
        raise ConfigError("--out: required with --vla_path alone (there is no run dir to write eval/ into)")
    if req.out is not None and Path(req.out).is_dir():
        raise ConfigError(f"--out: {req.out} is a directory; name the JSON file to write")


def _image_size(req: EvalRequest, run_size: int | None) -> int:
    size = req.image_size or run_size or DEFAULT_IMAGE_SIZE
    if req.videos and size % 2:
        raise ConfigError(f"--image-size: {size} is odd; mp4 videos (--videos) need an even frame size")
    return size


def rollout_all(tasks: list[str], source: ActionSource, req: EvalRequest,
                image_size: int) -> dict[str, list[EpisodeResult]]:
    """Every task's episodes, with one tqdm bar over all episodes."""
    from tqdm import tqdm

    results = {}
    with tqdm(total=len(tasks) * req.episodes, unit="episode", desc="eval", disable=not req.progress) as bar:
        def done(episode: EpisodeResult) -> None:
            bar.set_postfix(task=episode.task, success=episode.success, length=episode.length)
            bar.update(1)

        for task in tasks:
            results[task] = rollout_task(task, source, episodes=req.episodes, seed=req.seed,
                                         max_steps=req.max_steps, image_size=image_size,
                                         num_envs=req.num_envs, record=req.videos, on_episode=done)
    return results


def write_videos(results: dict[str, list[EpisodeResult]], video_dir: Path) -> list[str]:
    """mp4 of each recorded episode: `<task>-<index>.mp4`; returns the file names."""
    import numpy as np

    from steadyvla.data.video import encode_video

    names = []
    for task, episodes in results.items():
        for ep in episodes:
            if ep.frames:
                name = f"{task}-{ep.index:03d}.mp4"
                encode_video(np.stack(ep.frames), video_dir / name, fps=VIDEO_FPS)
                names.append(name)
    return names


def run_eval(req: EvalRequest, log=print, source: ActionSource | None = None,
             settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate and write the results JSON (and videos); returns the report.

    `source` replaces the model (tests: a scripted expert; periodic eval: the model in training);
    then `req.out` names the output. `settings` adds to what the report records about the run.
    """
    from steadyvla.eval.policy import check_action_dims, load_checkpoint_target, load_openvla_target, \
        vla_action_source
    from steadyvla.sim.metaworld import select_gl_backend

    check_request(req, needs_model=source is None)
    checkpoint = req.checkpoint
    if source is None and checkpoint is not None:  # fail fast, before the model stack loads
        from steadyvla.eval.inputs import resolve_checkpoint, run_statistics

        checkpoint = resolve_checkpoint(checkpoint)  # verified once; a named checkpoint resolves to itself
        run_statistics(checkpoint)
    settings = {"checkpoint": str(req.checkpoint) if req.checkpoint else None,
                "vla_path": str(req.vla_path) if req.vla_path else None, **(settings or {})}
    out, run_size = req.out, None
    if source is None:
        target = load_checkpoint_target(checkpoint, req.vla_path, req.unnorm_key, req.device) if checkpoint \
            else load_openvla_target(req.vla_path, req.unnorm_key, req.device)
        check_action_dims(target, METAWORLD_ACTION_DIMS)
        source, run_size = vla_action_source(target), target.demo_image_size
        out = out or default_results_path(target.run_dir, target.global_step)
        settings.update(checkpoint=str(target.checkpoint) if target.checkpoint else None,
                        global_step=target.global_step, unnorm_key=target.unnorm_key)
    image_size = _image_size(req, run_size)
    settings.update(seed=req.seed, episodes_per_task=req.episodes, max_steps=req.max_steps,
                    image_size=image_size, camera=DEFAULT_CAMERA, gl_backend=select_gl_backend())
    started = time.perf_counter()
    results = rollout_all(req.tasks, source, req, image_size)
    seconds = time.perf_counter() - started
    report = build_report(results, TASK_INSTRUCTIONS, settings)
    env_steps = sum(e.length for eps in results.values() for e in eps)
    report["timing"] = {"seconds": seconds, "env_steps": env_steps, "env_steps_per_s": env_steps / seconds}
    if req.videos:
        video_dir = Path(out).with_name(Path(out).stem + VIDEO_DIR_SUFFIX)
        report["videos"] = {"dir": str(video_dir), "files": write_videos(results, video_dir)}
    write_report(Path(out), report)
    log(format_summary(report))
    log(f"wrote {out}")
    return report
