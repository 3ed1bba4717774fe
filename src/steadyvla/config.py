"""Flat run configuration: YAML file + `--key value` CLI overrides, validated with field-named errors.

Keys keep the names of the users' existing OpenVLA YAML (DESIGN.md §4) so their configs load
unchanged; keys that only steered their old environment are accepted as documented no-ops.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from steadyvla.config_compat import NO_OP_KEYS, check_compat


class ConfigError(ValueError):
    """A config key or value is invalid; the message names the field, the value and what is valid."""


DEMO_DATASET_NAME = "metaworld_demo"

# Fields whose change would make a resumed run a different run (DESIGN.md §5, issue 3 and 8):
# compared on resume by resolved value, and only where the run uses them (`critical_values`).
# `data_root_dir` and `icms_artifact_dir` are absent on purpose: the checkpoint records a
# fingerprint of the dataset and a content hash of the ICSM artifacts, so an identical copy
# elsewhere (node-local staging) resumes and a changed one is refused.
RESUME_CRITICAL_FIELDS: tuple[str, ...] = (
    "model_preset",
    "vla_path",
    "tokenizer_path",
    "dtype",
    "use_lora",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "batch_size",
    "grad_accumulation_steps",
    "dataset_name",
    "image_key",
    "image_aug",
    "seed",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "min_learning_rate",
    "weight_decay",
    "max_grad_norm",
    "method_enabled",
)
# Only compared when the dataset is the generated demo: other settings regenerate it in place.
DEMO_CRITICAL_FIELDS: tuple[str, ...] = ("demo_episodes_per_task", "demo_image_size")
# Only compared for full training (`use_lora: false`): they change the optimizer's parameters.
FULL_TRAIN_CRITICAL_FIELDS: tuple[str, ...] = ("train_vision_backbone", "train_projector", "train_llm")
# Only compared when `method_enabled` is true: a baseline run never reads them.
METHOD_CRITICAL_FIELDS: tuple[str, ...] = (
    "prompt_template",  # the probe prompt of ICSM and the Thermostat; training's prompt is fixed
    "hsw_layer_ids",
    "hsw_beta",
    "hsw_gamma",
    "hsw_eps",
    "probe_dataset_name",
    "probe_jsonl",
    "probe_size",
    "probe_batch_size",
    "icsm_rank",
    "icsm_epsilon",
    "icsm_epsilon_absolute",
    "icsm_split",
    "icsm_fragile_dim",
    "icsm_plastic_dim",
    "icsm_fragile_fraction",
    "icsm_plastic_fraction",
    "icsm_sensitivity_samples",
    "thermostat_update_interval",
    "thermostat_warmup_steps",
    "thermostat_min_beta",
    "thermostat_max_beta",
    "thermostat_min_gamma",
    "thermostat_max_gamma",
    "thermostat_k_beta",
    "thermostat_k_gamma",
    "thermostat_base_scale",
)


def resolved_lora_alpha(lora_alpha: int | None, lora_rank: int) -> int:
    """`lora_alpha`, with null resolved as OpenVLA's finetune.py does: min(lora_rank, 16)."""
    return lora_alpha if lora_alpha is not None else min(lora_rank, 16)


def critical_values(values: dict[str, Any]) -> dict[str, Any]:
    """The resume-critical settings a run with these config values uses, resolved (`lora_alpha`
    null -> its value; `min_learning_rate` only under cosine; method keys only with the method
    on). Works on stored config dicts too; keys they lack are left out."""
    keys = list(RESUME_CRITICAL_FIELDS)
    if values.get("lr_scheduler") != "cosine":
        keys.remove("min_learning_rate")
    if values.get("dataset_name") == DEMO_DATASET_NAME:
        keys += DEMO_CRITICAL_FIELDS
    if values.get("method_enabled"):
        keys += METHOD_CRITICAL_FIELDS
    if values.get("use_lora") is False:
        keys += FULL_TRAIN_CRITICAL_FIELDS
    out = {k: values[k] for k in keys if k in values}
    if "lora_alpha" in out and "lora_rank" in out:
        out["lora_alpha"] = resolved_lora_alpha(out["lora_alpha"], out["lora_rank"])
    return out


# torch.compile modes that capture CUDA graphs (their outputs are overwritten by the next replay).
CUDA_GRAPH_COMPILE_MODES: tuple[str, ...] = ("reduce-overhead", "max-autotune")
NULLABLE_CHOICES = frozenset({"compile_mode"})  # null: chosen at run time (train/fast_paths.py)
CHOICES: dict[str, tuple[str, ...]] = {
    "lr_scheduler": ("none", "cosine"),
    "model_preset": ("tiny", "openvla-7b", "vla-1b"),
    "dtype": ("float32", "bfloat16"),
    "reduce_dtype": ("float32", "bfloat16"),
    "strategy": ("fsdp", "ddp"),
    "icsm_split": ("ranked", "extremes"),
    "compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
}


@dataclass
class RunConfig:
    """Every setting of a run. Field docs are the user-facing documentation of each key."""

    # --- model
    model_preset: str = "tiny"  # tiny | openvla-7b | vla-1b (OpenVLA's towers + a ~1B Llama, 1.83B in all)
    vla_path: str | None = None  # local OpenVLA HF dir (weights + tokenizer); None = random init of the preset
    tokenizer_path: str | None = None  # tokenizer dir for a random-init preset other than tiny (e.g. Llama-2)
    dtype: str = "float32"  # parameter/compute dtype for training
    # --- data
    data_root_dir: str = "demo_data"
    dataset_name: str = "metaworld_demo"
    image_key: str | None = None  # dataset image feature; None = the first one
    image_aug: bool = False
    num_workers: int = 0
    shuffle_buffer_size: int | None = None  # old RLDS knob; sampling is index-based, no buffer
    demo_episodes_per_task: int = 4  # used only when the demo dataset must be generated
    demo_image_size: int = 224
    # --- run layout
    run_root_dir: str = "runs"
    run_id: str | None = None  # None = derived from the config (stable, so re-running resumes)
    run_id_note: str | None = None
    # --- optimisation
    batch_size: int = 8
    grad_accumulation_steps: int = 1
    max_steps: int = 100
    learning_rate: float = 5e-4
    min_learning_rate: float = 0.0
    lr_scheduler: str = "none"
    lr_warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 7
    # --- memory (steadyvla memory; preflight before the first step)
    activation_checkpointing: bool = False  # recompute LLM layer activations in backward: far less GPU memory
    force: bool = False  # start even when the memory preflight says the run will not fit
    # --- speed (fast paths; each gives the same math as the plain path up to round-off, none is
    # resume-critical; docs/PERFORMANCE.md measures them)
    logits_at_labels_only: bool = True  # LM head + loss only at text positions, never at the 256 patches
    deterministic: bool = False  # GPU: deterministic kernels only (bitwise-repeatable runs; slower). CPU always is
    compile_blocks: bool | None = None  # torch.compile each decoder/ViT block; null = on CUDA, off on CPU
    # torch.compile mode of the blocks (reduce-overhead, max-autotune: CUDA graphs per block); null =
    # reduce-overhead where CUDA graphs are known safe, else default (train/fast_paths.py)
    compile_mode: str | None = None
    fused_optimizer: bool | None = None  # fused AdamW + foreach grad clipping; null = on CUDA, off on CPU
    lora_in_model_dtype: bool = True  # LoRA matmuls in the model's dtype (bf16), fp32 master weights kept
    # --- LoRA
    use_lora: bool = True
    lora_rank: int = 32
    lora_alpha: int | None = None  # None = min(lora_rank, 16), as OpenVLA's finetune.py
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"
    merge_lora_during_training: bool = False
    # --- logging and checkpoints
    log_every_steps: int = 1
    save_steps: int = 50
    save_latest_checkpoint_only: bool = False
    keep_last_k: int | None = None
    async_save: bool = True
    progress_bar: bool = True
    # --- resume (users' keys + `resume`)
    resume: str = "auto"  # auto | never | <checkpoint or run dir>
    resume_adapter_dir: str | None = None
    resume_global_step: int | None = None
    resume_step_override: bool = False
    resume_rewind: bool = False  # go back to an explicit target older than the run's newest checkpoint
    resume_full_model_dir: str | None = None
    # --- launchers (scripts/run_*.sh supervise the run)
    restart_on_failure: int = 0  # relaunch with resume: auto after a crash / kill, up to N times
    restart_backoff_s: float = 10.0  # wait before restart k: backoff * 2^(k-1) seconds, at most 300
    # --- full training (FSDP/DDP; `steadyvla train`)
    pretrained_checkpoint: str | None = None
    is_resume: bool = False
    resume_step: int | None = None
    resume_epoch: int | None = None
    save_interval: int | None = None  # the users' train.py name for `save_steps` (wins when both are set)
    strategy: str = "fsdp"  # fsdp (FSDP2 fully_shard per block) | ddp (every rank holds the whole model)
    reshard_after_forward: bool = True  # FSDP2: true = full shard; false = keep gathered params until backward
    hsdp_replicate_degree: int = 1  # >1: HSDP, a (replicate, shard) device mesh; must divide the world size
    reduce_dtype: str = "float32"  # dtype of the gradient reduction (`dtype` is the compute dtype)
    train_vision_backbone: bool = True  # full training: which parts get gradients (OpenVLA's stages)
    train_projector: bool = True
    train_llm: bool = True
    # --- method (ICSM + HSW + Thermostat)
    method_enabled: bool = False
    icms_artifact_dir: str | None = None
    hsw_layer_ids: list[int] | None = None
    hsw_beta: float = 1.0
    hsw_gamma: float = 1.0
    hsw_eps: float = 1e-6
    prompt_template: str | None = None  # probe prompt of ICSM + Thermostat (never training's); None = PROBE_PROMPT_TEMPLATE
    probe_dataset_name: str | None = None  # None = the training dataset
    probe_jsonl: str | None = None  # alternative: lines of {"image": path, "instruction": text}
    probe_root_dir: str | None = None  # root holding probe_dataset_name; None = data_root_dir
    probe_image_root: str | None = None  # base of relative probe_jsonl image paths; None = the file's dir
    artifact_dir: str | None = None  # where ICSM artifacts go when icms_artifact_dir is unset
    probe_size: int = 500
    probe_batch_size: int = 4
    icsm_rank: int = 128  # r: candidate directions from the SVD
    icsm_epsilon: float = 0.5  # injection size, relative to the RMS of the pooled states
    icsm_epsilon_absolute: float | None = None  # absolute injection size instead (the users' `epsilon`)
    icsm_split: str = "ranked"  # ranked: U_f top, U_p next | extremes: U_f top, U_p least sensitive (users')
    icsm_fragile_dim: int | None = None  # |U_f| instead of the fraction (ranked) or r/2 (extremes)
    icsm_plastic_dim: int | None = None  # |U_p| instead of the fraction (ranked) or r/4 (extremes)
    icsm_batch_size: int = 16  # teacher forward batch of the offline build
    icsm_fragile_fraction: float = 0.25  # share of the r directions that become U_f
    icsm_plastic_fraction: float = 0.25  # share that becomes U_p (the rest is null)
    icsm_sensitivity_samples: int = 32
    thermostat_update_interval: int = 50
    thermostat_warmup_steps: int = 20
    thermostat_min_beta: float = 0.1
    thermostat_max_beta: float = 1.0
    thermostat_min_gamma: float = 0.0
    thermostat_max_gamma: float = 1.0
    thermostat_k_beta: float = 1.0
    thermostat_k_gamma: float = 2.0
    thermostat_base_scale: float = 1.0
    # --- periodic evaluation during training (MetaWorld v3 rollouts on rank 0; eval/periodic.py)
    enable_periodic_eval: bool = False
    eval_every_steps: int = 100  # every eval step also saves a checkpoint (the best one must exist)
    eval_tasks: str | None = None  # comma-separated MetaWorld v3 tasks; None = the training data's MetaWorld tasks
    eval_episodes: int = 10  # per task (`steadyvla eval --episodes`)
    eval_seed: int = 0  # env placements (`steadyvla eval --seed`); independent of the training seed
    eval_max_episode_steps: int = 150  # horizon of one episode (`steadyvla eval --max-steps`)
    eval_num_envs: int = 8  # environments stepped in lockstep, one model batch per step
    early_stopping_enabled: bool = False  # needs enable_periodic_eval; score = mean success rate over eval_tasks
    early_stopping_patience: int = 5  # evaluations in a row without improvement before the run stops
    early_stopping_min_delta: float = 0.0  # an eval improves when it beats the best score by at least this
    # --- the users' other settings (config_compat.py)
    use_quantization: bool = False  # true is refused until quantized loading exists
    use_wandb: bool = False  # also log metrics to Weights & Biases (pip extra `wandb`)
    wandb_project: str = "openvla"
    wandb_entity: str | None = None  # None = the W&B account's default entity
    # accepted no-op keys land here so config.yaml records what the user wrote
    ignored_keys: dict[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """sha256 of the resume-critical fields: equal digests mean a resume is safe."""
        critical = critical_values(self.to_dict())
        return hashlib.sha256(json.dumps(critical, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (what config.yaml stores)."""
        return dataclasses.asdict(self)

    @property
    def effective_lora_alpha(self) -> int:
        return resolved_lora_alpha(self.lora_alpha, self.lora_rank)


def known_keys() -> list[str]:
    return [f.name for f in fields(RunConfig) if f.name != "ignored_keys"]


def _closest(key: str) -> str:
    match = difflib.get_close_matches(key, known_keys() + list(NO_OP_KEYS), n=1, cutoff=0.0)
    return match[0] if match else "?"


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert `value` to the field's type or raise ConfigError naming field, value and valid type."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    optional = type(None) in get_args(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config field `{name}`: null is not allowed; expected {_type_name(annotation)}")
    target = args[0] if args and get_origin(annotation) is not list else annotation
    if get_origin(target) is list:
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                value = [int(v) for v in str(value).split(",")] if isinstance(value, str) else [value]
            except ValueError:
                pass  # reported below
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"config field `{name}`: {value!r} is not a list of integers (e.g. [28, 31] or 28,31)")
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config field `{name}`: {value!r} is not a boolean; use true or false")
    if target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config field `{name}`: {value!r} is not an integer")
    if target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config field `{name}`: {value!r} is not a number")
    if target is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config field `{name}`: {value!r} is not a string")
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _validate(cfg: RunConfig) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(cfg, key)
        if value not in allowed and not (value is None and key in NULLABLE_CHOICES):
            raise ConfigError(f"config field `{key}`: {value!r} is not one of {', '.join(allowed)}")
    positive = ("batch_size", "grad_accumulation_steps", "max_steps", "save_steps", "lora_rank",
                "log_every_steps", "probe_batch_size", "thermostat_update_interval", "probe_size", "icsm_rank",
                "icsm_sensitivity_samples", "icsm_batch_size", "eval_every_steps", "eval_episodes", "eval_num_envs",
                "early_stopping_patience")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be >= 1")
    for key in ("lr_warmup_steps", "num_workers", "thermostat_warmup_steps", "demo_episodes_per_task",
                "restart_on_failure", "restart_backoff_s"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be >= 0")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"config field `lora_dropout`: {cfg.lora_dropout} must be in [0, 1)")
    for key in ("icsm_fragile_fraction", "icsm_plastic_fraction"):
        if not 0.0 <= getattr(cfg, key) <= 1.0:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be in [0, 1]")
    if cfg.icsm_fragile_fraction + cfg.icsm_plastic_fraction > 1.0:
        raise ConfigError(f"config fields `icsm_fragile_fraction` + `icsm_plastic_fraction`: "
                          f"{cfg.icsm_fragile_fraction} + {cfg.icsm_plastic_fraction} must be <= 1")
    for key in ("icsm_fragile_dim", "icsm_plastic_dim"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be >= 0 or null")
    if cfg.icsm_epsilon_absolute is not None and cfg.icsm_epsilon_absolute <= 0:
        raise ConfigError(f"config field `icsm_epsilon_absolute`: {cfg.icsm_epsilon_absolute} must be > 0 or null")
    if cfg.prompt_template is not None and "{instruction}" not in cfg.prompt_template:
        raise ConfigError(f"config field `prompt_template`: {cfg.prompt_template!r} must contain {{instruction}}")
    if cfg.learning_rate <= 0:
        raise ConfigError(f"config field `learning_rate`: {cfg.learning_rate} must be > 0")
    if not 0 <= cfg.min_learning_rate <= cfg.learning_rate:
        raise ConfigError(
            f"config field `min_learning_rate`: {cfg.min_learning_rate} must be in [0, learning_rate={cfg.learning_rate}]"
        )
    _validate_eval(cfg)
    if cfg.compile_mode in CUDA_GRAPH_COMPILE_MODES and cfg.grad_accumulation_steps > 1:
        raise ConfigError(
            f"config field `compile_mode`: {cfg.compile_mode!r} replays CUDA graphs, and the next micro-batch's "
            f"replay overwrites the gradients the previous one left (pytorch/pytorch#169545: silently wrong "
            f"gradients); it needs `grad_accumulation_steps: 1` (got {cfg.grad_accumulation_steps}). Use "
            "compile_mode: default, or leave it null to have the fastest safe mode chosen")
    if cfg.keep_last_k is not None and cfg.keep_last_k < 1:
        raise ConfigError(f"config field `keep_last_k`: {cfg.keep_last_k} must be >= 1 or null")
    if cfg.resume_global_step is not None and cfg.resume_global_step < 0:
        raise ConfigError(f"config field `resume_global_step`: {cfg.resume_global_step} must be >= 0 or null")
    for key in ("hsdp_replicate_degree",):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be >= 1")
    if cfg.hsdp_replicate_degree > 1 and cfg.strategy != "fsdp":
        raise ConfigError(f"config field `hsdp_replicate_degree`: {cfg.hsdp_replicate_degree} needs `strategy: fsdp` "
                          f"(got {cfg.strategy!r}); use 1 with ddp")
    if cfg.save_interval is not None and cfg.save_interval < 1:
        raise ConfigError(f"config field `save_interval`: {cfg.save_interval} must be >= 1 or null")
    for key in ("resume_step", "resume_epoch"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 0:
            raise ConfigError(f"config field `{key}`: {getattr(cfg, key)} must be >= 0 or null")
    if not cfg.use_lora and not (cfg.train_vision_backbone or cfg.train_projector or cfg.train_llm):
        raise ConfigError("config fields `train_vision_backbone`/`train_projector`/`train_llm`: all false leaves "
                          "nothing to train; set at least one to true")
    if cfg.resume not in ("auto", "never") and not cfg.resume.strip():
        raise ConfigError("config field `resume`: empty; use auto, never or a checkpoint/run directory")


def _validate_eval(cfg: RunConfig) -> None:
    from steadyvla.sim.metaworld import METAWORLD_MAX_STEPS, TASK_INSTRUCTIONS

    if not 1 <= cfg.eval_max_episode_steps <= METAWORLD_MAX_STEPS:
        raise ConfigError(f"config field `eval_max_episode_steps`: {cfg.eval_max_episode_steps} must be in "
                          f"[1, {METAWORLD_MAX_STEPS}] (MetaWorld's episode limit)")
    if cfg.early_stopping_min_delta < 0:
        raise ConfigError(f"config field `early_stopping_min_delta`: {cfg.early_stopping_min_delta} must be >= 0")
    if cfg.eval_tasks is not None:
        tasks = [t.strip() for t in cfg.eval_tasks.split(",") if t.strip()]
        unknown = [t for t in tasks if t not in TASK_INSTRUCTIONS]
        if not tasks or unknown or len(set(tasks)) != len(tasks):
            what = f"unknown {', '.join(unknown)}" if unknown else "empty or repeated names"
            raise ConfigError(f"config field `eval_tasks`: {cfg.eval_tasks!r}: {what}; valid: comma-separated "
                              f"distinct MetaWorld v3 tasks from {', '.join(TASK_INSTRUCTIONS)}, or null for "
                              "the training data's tasks")


def build_config(values: dict[str, Any]) -> RunConfig:
    """Build a validated RunConfig from a flat dict (YAML contents merged with CLI overrides)."""
    hints = get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    ignored: dict[str, Any] = {}
    for key, value in values.items():
        if key in NO_OP_KEYS:
            ignored[key] = value
            continue
        if key not in hints or key == "ignored_keys":
            raise ConfigError(f"unknown config key `{key}`; did you mean `{_closest(key)}`?")
        kwargs[key] = _coerce(key, value, hints[key])
    if kwargs.get("save_interval") is not None:  # the users' full-training name of the same setting
        kwargs["save_steps"] = kwargs["save_interval"]
    cfg = RunConfig(**kwargs, ignored_keys=ignored)
    _validate(cfg)
    check_compat(cfg)
    return cfg


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """`--key value` pairs → dict; values read as YAML scalars (true, false, null, numbers)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; overrides are written `--key value`")
        key = token[2:]
        if "=" in key:  # split before renaming: the value may hold dashes (`--layer_ids=-2,-1`)
            key, raw = key.split("=", 1)
            key = key.replace("-", "_")
            i += 1
        else:
            key = key.replace("-", "_")
            if i + 1 >= len(argv):
                raise ConfigError(f"override `--{key}` has no value; write `--{key} VALUE`")
            raw = argv[i + 1]
            i += 2
        out[key] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config (flat mapping), apply overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: file not found")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--config {path}: not valid YAML{at}: {problem}; fix the file "
                              "(keys are written `key: value`, one per line)") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {path}: expected a mapping of `key: value`, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    return build_config(values)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of the resolved config (stable key order = field order)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
