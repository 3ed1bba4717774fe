"""The users' OpenVLA keys (../shared/reference/users-configs/KEYS.md) and what steadyvla does with each.

Every key of their fine-tuning, full-training and offline-ICSM configs is one of:
- the same key with the same meaning (a RunConfig field of that name);
- mapped: a RunConfig field of that name whose steadyvla meaning is described in `MAPPED_KEYS`
  (e.g. `artifact_dir` is where ICSM artifacts go when `icms_artifact_dir` is unset);
- ignored: listed in `NO_OP_KEYS`, accepted, recorded under `ignored_keys` and announced at start;
- refused: `use_quantization: true` (there is no quantized loading yet).
Their offline-ICSM option names are accepted by `steadyvla icsm build` via `ICSM_OPTION_ALIASES`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyvla.config import RunConfig

_NO_LIBERO = "LIBERO cannot be simulated here; periodic evaluation runs MetaWorld v3"
# Keys that steered the users' old environment only: accepted, ignored, announced at start.
NO_OP_KEYS: dict[str, str] = {
    "cache_dir": "HF hub cache; steadyvla loads weights from local directories only",
    "adapter_tmp_dir": "adapters are saved inside the run dir's checkpoints/",
    "tmp_dir": "checkpoints are written to a temporary sibling inside the run dir, then renamed",
    "server_profile": "read by scripts/run_*.sh (process count, batch size, accumulation), not by the trainer",
    "rlds_frame_parallel_calls": "TensorFlow RLDS parallelism; steadyvla reads RLDS without TensorFlow "
                                 "(see `num_workers`)",
    "rlds_traj_transform_threads": "TensorFlow RLDS parallelism; see `num_workers`",
    "rlds_traj_read_threads": "TensorFlow RLDS parallelism; see `num_workers`",
    "eval_task_suite_name": f"{_NO_LIBERO}; `eval_tasks` names the MetaWorld v3 tasks",
    "eval_num_trials_per_task": f"{_NO_LIBERO}; `eval_episodes` is the number of episodes per task",
    "eval_center_crop": f"{_NO_LIBERO}; evaluation uses the training run's preprocessing",
    "eval_run_id_note": f"{_NO_LIBERO}; results go to <run_dir>/eval/",
    "eval_cpu_fallback_on_oom": f"{_NO_LIBERO}; evaluation runs on the training device",
    "hf_token": "nothing is downloaded; vla_path and data_root_dir are local",
    "trackers": "metrics go to metrics.jsonl and TensorBoard; `use_wandb: true` adds Weights & Biases",
    "vla": "full training's model registry choice; the model is `model_preset` + `vla_path`",
    "probe_shuffle_buffer_size": "the probe draw is a seeded index sample, no shuffle buffer",
    "probe_num_parallel_calls": "TensorFlow RLDS parallelism of the probe reader",
}

# Keys that exist as RunConfig fields but mean something steadyvla does its own way.
MAPPED_KEYS: dict[str, str] = {
    "artifact_dir": "ICSM artifacts go to <artifact_dir>/icms_<model>-<dataset>-r<icsm_rank>-seed<seed> "
                    "when `icms_artifact_dir` is unset",
    "probe_root_dir": "the root that `probe_dataset_name` is read from (default: data_root_dir)",
    "probe_image_root": "the base of relative image paths in `probe_jsonl` (default: the file's directory)",
    "early_stopping_enabled": "stops the run once the periodic evaluation's mean success rate over `eval_tasks` "
                              "has not improved by `early_stopping_min_delta` for `early_stopping_patience` "
                              "evaluations in a row (needs `enable_periodic_eval: true`)",
    "save_interval": "full training's name of `save_steps`: when set, it is the save interval (it wins over "
                     "`save_steps`)",
    "use_wandb": "logs every metrics.jsonl row to Weights & Biases too (pip extra `wandb`)",
}

# `steadyvla icsm build` option names of the users' offline_icms.py -> RunConfig fields.
ICSM_OPTION_ALIASES: dict[str, str] = {
    "r": "icsm_rank",
    "epsilon": "icsm_epsilon_absolute",  # theirs is an absolute injection size; ours is relative
    "fragile_dim": "icsm_fragile_dim",
    "plastic_dim": "icsm_plastic_dim",
    "max_samples": "probe_size",
    "sensitivity_samples": "icsm_sensitivity_samples",
    "layer_ids": "hsw_layer_ids",
    "batch_size": "icsm_batch_size",  # the teacher's forward batch there, not the training batch
}


def translate_icsm_options(values: dict[str, Any]) -> dict[str, Any]:
    """Rename the users' offline-ICSM option names to RunConfig keys (ours pass through)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        target = ICSM_OPTION_ALIASES.get(key, key)
        if target in out and target != key:
            from steadyvla.config import ConfigError

            raise ConfigError(f"`--{key}` and `--{target}` both given; they set the same setting")
        out[target] = value
    return out


def check_compat(cfg: RunConfig) -> None:
    """Refuse the users' settings that cannot be honoured (named field, value and why)."""
    from steadyvla.config import ConfigError

    if cfg.use_quantization:
        raise ConfigError("config field `use_quantization`: true is not supported yet (no 4/8-bit loading of "
                          "the base model here); use false — LoRA on the bf16 model (`dtype: bfloat16`) instead")


def compat_notes(cfg: RunConfig) -> list[str]:
    """One line per users' key in this config that is ignored or means something different here."""
    notes = [f"{key}: accepted and ignored ({NO_OP_KEYS[key]})" for key in cfg.ignored_keys if key in NO_OP_KEYS]
    if cfg.artifact_dir and not cfg.icms_artifact_dir and cfg.method_enabled:
        notes.append(f"artifact_dir: {MAPPED_KEYS['artifact_dir']}")
    if cfg.probe_root_dir and cfg.method_enabled:
        notes.append(f"probe_root_dir: {MAPPED_KEYS['probe_root_dir']}")
    return notes
