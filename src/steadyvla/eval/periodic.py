"""Periodic evaluation during training, as a `TrainHook` on the one training loop.

Every `eval_every_steps` optimizer steps, rank 0 runs `steadyvla eval`'s closed-loop MetaWorld v3
rollouts (`eval.command.run_eval`) with the model being trained, and writes the same results file,
`<run_dir>/eval/step-XXXXXX.json`. The other ranks receive the results, so every rank logs and
decides the same. Under DDP they wait; under FSDP (`steadyvla train`) they run each policy forward
with rank 0 on the inputs it broadcasts, since each holds a shard of the weights (`rank_link.py`).

Training is not disturbed: the model is evaluated in eval mode under `no_grad` and every module's
train/eval flag is put back; the Python, NumPy, torch CPU and CUDA RNG states are saved before and
restored after, and the rollouts draw only from generators seeded with `eval_seed`. A run with
periodic eval on trains bitwise the same weights as with it off.

Score: the mean success rate over the evaluated tasks (`eval_success_rate`). Early stopping
(`eval/early_stopping.py`) tracks the best score; its state is in every checkpoint. Every eval step
also saves a checkpoint, so the best score always has one, and retention never deletes it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from steadyvla.checkpoint.state import restore_rng, snapshot_rng
from steadyvla.config import ConfigError, RunConfig
from steadyvla.distributed import DistEnv
from steadyvla.eval.early_stopping import EarlyStopping
from steadyvla.eval.rank_link import RankLink, from_rank0
from steadyvla.faults import fault_point
from steadyvla.hooks import TrainHook

HOOK_NAME = "periodic_eval"  # trainer_state.json["method"]["periodic_eval"]
SCORE_KEY = "eval_success_rate"  # metrics.jsonl; per task: eval_success_rate/<task>
TASK_SCORE_KEY = SCORE_KEY + "/{task}"
LENGTH_KEY = "eval_mean_episode_length"
BEST_SCORE_KEY = "eval_best_success_rate"
BEST_STEP_KEY = "eval_best_step"
PATIENCE_LEFT_KEY = "eval_patience_left"
METAWORLD_ACTION_DIMS = 4


def _tasks_in_data(source: Any) -> list[str]:
    """The MetaWorld v3 tasks whose instruction the training data uses (by exact instruction)."""
    from steadyvla.sim.metaworld import TASK_INSTRUCTIONS

    offered = getattr(source, "instructions", None)
    instructions = offered() if callable(offered) else offered
    present = {str(text).strip().lower() for text in instructions or ()}
    return [task for task, text in TASK_INSTRUCTIONS.items() if text in present]


def periodic_eval_tasks(cfg: RunConfig, source: Any, action_dims: int,
                        log: Callable[[str], None]) -> list[str] | None:
    """The tasks periodic evaluation runs, or None when it is off. `eval_tasks` null takes the
    training data's MetaWorld tasks; data without any (e.g. LIBERO, which cannot be simulated here)
    switches it off with a message. Raises ConfigError (before anything is written) when it cannot run."""
    if not cfg.enable_periodic_eval:
        return None
    if cfg.eval_tasks is not None:
        tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]  # validated in config.py
    else:
        tasks = _tasks_in_data(source)
        if not tasks:
            log(f"enable_periodic_eval: the training data {cfg.dataset_name!r} has no MetaWorld v3 task, and "
                "periodic evaluation runs MetaWorld v3 only (LIBERO cannot be simulated here): it is off for "
                "this run (early stopping too). Set `eval_tasks` to evaluate on MetaWorld tasks anyway")
            return None
    if action_dims != METAWORLD_ACTION_DIMS:
        raise ConfigError(f"config field `enable_periodic_eval`: true, but the training data {cfg.dataset_name!r} "
                          f"has {action_dims}-dimensional actions; MetaWorld v3 needs {METAWORLD_ACTION_DIMS} "
                          "(dx, dy, dz, gripper). Set enable_periodic_eval: false for this data")
    import importlib.util

    from steadyvla.sim.metaworld import INSTALL_HINT

    if importlib.util.find_spec("metaworld") is None or importlib.util.find_spec("mujoco") is None:
        raise ConfigError(f"config field `enable_periodic_eval`: true, but {INSTALL_HINT}")
    return tasks


def eval_settings(cfg: RunConfig, tasks: list[str]) -> dict[str, Any]:
    """What makes two evaluations' scores comparable (stored with the early-stopping state)."""
    return {"tasks": list(tasks), "episodes": cfg.eval_episodes, "seed": cfg.eval_seed,
            "max_episode_steps": cfg.eval_max_episode_steps, "image_size": cfg.demo_image_size}


def _tracker_from(cfg: RunConfig, tasks: list[str], meta: dict[str, Any],
                  log: Callable[[str], None] = lambda _m: None) -> EarlyStopping:
    tracker = EarlyStopping(cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.early_stopping_enabled)
    if not meta:
        return tracker
    if meta.get("settings") != eval_settings(cfg, tasks):
        old_best = meta.get("tracker", {}).get("best_step")
        log(f"periodic eval settings changed since the checkpoint ({meta.get('settings')} -> "
            f"{eval_settings(cfg, tasks)}): scores are not comparable, so the best score and patience start over"
            + (f" (retention no longer keeps the old best, step {old_best})" if old_best is not None else ""))
        return tracker
    tracker.load_state_dict(meta.get("tracker", {}))
    return tracker


def _is_fsdp(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def best_checkpoint(run_dir: Path, step: int | None) -> Path | None:
    """The complete checkpoint dir of `step` in `run_dir`, if there is one."""
    from steadyvla.checkpoint.manager import CheckpointManager

    if step is None:
        return None
    found = [i.path for i in CheckpointManager(run_dir, log=lambda _m: None).list_checkpoints(deep=False)
             if i.step == step and i.complete]
    return found[0] if found else None


def _stop_summary(tracker: EarlyStopping, run_dir: Path) -> str:
    where = best_checkpoint(run_dir, tracker.best_step)
    return (f"best {SCORE_KEY} {tracker.best_score:.3f} at step {tracker.best_step}, checkpoint "
            f"{where if where is not None else '(not found)'}")


def stopped_early_message(cfg: RunConfig, trainer_state: dict[str, Any], tasks: list[str],
                          run_dir: Path) -> str | None:
    """A message when the checkpoint a run resumes from had already stopped early (nothing to do)."""
    meta = trainer_state.get("method", {}).get(HOOK_NAME, {})
    tracker = _tracker_from(cfg, tasks, meta)
    if not tracker.should_stop:
        return None
    return (f"run already stopped early at step {trainer_state['global_step']}: {tracker.evals_without_improvement} "
            f"evaluation(s) without improvement (early_stopping_patience {cfg.early_stopping_patience}); "
            f"{_stop_summary(tracker, run_dir)}. Nothing to do; raise early_stopping_patience or set "
            "early_stopping_enabled: false to train on")


@contextmanager
def isolated_eval(model: torch.nn.Module, rank: int, seed: int) -> Iterator[None]:
    """Eval mode, no_grad and RNGs seeded with `seed`; afterwards every module's mode and every RNG
    state (Python, NumPy, torch CPU, this rank's CUDA device) are exactly as before."""
    rng_tensors, rng_meta = snapshot_rng(rank)
    modes = [(module, module.training) for module in model.modules()]
    random.seed(seed)
    np.random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed(seed)  # this rank's device only
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        restore_rng(rank, rng_tensors, rng_meta)


class PeriodicEvalHook(TrainHook):
    """Closed-loop MetaWorld evaluation every `eval_every_steps` steps, plus early stopping."""

    name = HOOK_NAME

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, tokenizer: Any, spec: Any, norm_stats: dict,
                 tasks: list[str], run_dir: Path, env: DistEnv, log: Callable[[str], None]):
        from steadyvla.eval.policy import EvalTarget, vla_action_source
        from steadyvla.model.bundle import VLABundle

        self.cfg, self.tasks, self.run_dir, self.env, self.log = cfg, list(tasks), Path(run_dir), env, log
        self.model = model  # the PeftModel or the full VLA: eval mode for all of it
        vla = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.bundle = VLABundle(vla, tokenizer, spec, norm_stats)
        self.act = vla_action_source(EvalTarget(self.bundle, cfg.dataset_name))
        self.sharded = _is_fsdp(vla)  # every rank joins every forward
        # full training outside FSDP keeps float32 master weights and computes under autocast
        dtype = getattr(torch, cfg.dtype)
        self.autocast = dtype if not self.sharded and dtype != torch.float32 and \
            vla.projector.fc1.weight.dtype == torch.float32 else None
        self.tracker = _tracker_from(cfg, self.tasks, {})

    def _due(self, step: int) -> bool:
        return step % self.cfg.eval_every_steps == 0

    def wants_checkpoint(self, step: int) -> bool:
        return self._due(step)  # the best step must have a checkpoint

    def protected_steps(self) -> set[int]:
        return {self.tracker.best_step} if self.tracker.best_step is not None else set()

    def should_stop(self) -> bool:
        return self.tracker.should_stop

    def stop_message(self) -> str:
        return (f"early stopping at step {self.tracker.history[-1][0]}: {SCORE_KEY} has not improved by "
                f">= {self.cfg.early_stopping_min_delta} for {self.tracker.evals_without_improvement} evaluation(s) "
                f"(early_stopping_patience {self.cfg.early_stopping_patience}); {_stop_summary(self.tracker, self.run_dir)}")

    @contextmanager
    def _evaluating(self) -> Iterator[None]:
        """On every rank: `isolated_eval`; under FSDP the root's own parameters gathered (the policy
        calls the VLA's parts, not its root forward, which would gather them) and sharded again after."""
        with ExitStack() as stack:
            stack.enter_context(isolated_eval(self.model, self.env.rank, self.cfg.eval_seed))
            if self.autocast is not None:
                stack.enter_context(torch.autocast(self.bundle.device.type, dtype=self.autocast))
            if self.sharded:
                vla = self.bundle.model
                vla.unshard()
                stack.callback(vla.reshard)
            yield

    def _evaluate(self, step: int, link: RankLink) -> dict[str, Any]:
        from steadyvla.eval.command import EvalRequest, run_eval
        from steadyvla.eval.report import default_results_path

        cfg = self.cfg

        def source(images, instructions, states):
            if self.sharded:
                link.share((images, instructions, states))  # the other ranks run this forward too
            else:
                link.beat()
            return self.act(images, instructions, states)

        req = EvalRequest(tasks=self.tasks, episodes=cfg.eval_episodes, seed=cfg.eval_seed,
                          max_steps=cfg.eval_max_episode_steps, out=default_results_path(self.run_dir, step),
                          image_size=cfg.demo_image_size, num_envs=cfg.eval_num_envs, progress=False)
        self.log(f"step {step}: periodic evaluation on {', '.join(self.tasks)}, {cfg.eval_episodes} episode(s) per task")
        report = run_eval(req, log=lambda text: [self.log(line) for line in text.splitlines()], source=source,
                          settings={"global_step": step, "run_dir": str(self.run_dir),
                                    "unnorm_key": cfg.dataset_name, "during_training": True})
        rates = {task: float(row["success_rate"]) for task, row in report["tasks"].items()}
        return {"rates": rates, "score": sum(rates.values()) / len(rates),
                "mean_episode_length": float(report["overall"]["mean_episode_length"])}

    def _follow(self, query: tuple) -> None:
        self.act(*query)  # rank 0 uses its own result

    def at_step_boundary(self, step: int) -> dict[str, float]:
        if not self._due(step):
            return {}
        with self._evaluating():
            result = from_rank0(lambda link: self._evaluate(step, link), self.env,
                                self._follow if self.sharded else None)
        improved = self.tracker.observe(step, result["score"])
        fault_point("after_eval", step)  # tests: evaluated, checkpoint of this step not yet written
        metrics = {SCORE_KEY: result["score"], LENGTH_KEY: result["mean_episode_length"],
                   **{TASK_SCORE_KEY.format(task=t): r for t, r in result["rates"].items()},
                   BEST_SCORE_KEY: self.tracker.best_score, BEST_STEP_KEY: float(self.tracker.best_step)}
        if self.cfg.early_stopping_enabled:
            metrics[PATIENCE_LEFT_KEY] = float(self.tracker.patience_left)
        self.log(f"step {step}: {SCORE_KEY} {result['score']:.3f}"
                 + (" (new best)" if improved else f" (best {self.tracker.best_score:.3f} at step "
                                                     f"{self.tracker.best_step})")
                 + (f", patience left {self.tracker.patience_left}" if self.cfg.early_stopping_enabled else ""))
        return metrics

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"settings": eval_settings(self.cfg, self.tasks), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.tracker = _tracker_from(self.cfg, self.tasks, meta, self.log)
