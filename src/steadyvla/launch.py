"""The users' launcher interface (scripts/run_method_train.sh, scripts/run_baseline_lora.sh, scripts/run_full_train.sh).

    run_method_train.sh [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [EVAL_EVERY] [PATIENCE] [--key value ...]
    run_full_train.sh [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [--key value ...]   (`steadyvla train`)

Environment overrides as in their scripts: SERVER_PROFILE (else the YAML's `server_profile`),
BATCH_SIZE, GRAD_ACCUM, PROBE_BATCH_SIZE, THERMO_UPDATE, THERMO_WARMUP (method only), RESUME_ADAPTER,
RESUME_STEP, CLEAN_STALE_GPU_PROCS; CONFIG picks the YAML. Full training takes PRETRAINED_CHECKPOINT
and RESUME_STEP / RESUME_EPOCH (its `pretrained_checkpoint`, `resume_step`, `resume_epoch`) instead of
RESUME_ADAPTER, and switches no periodic evaluation on. Every one that is set must be understood:
a bad value is an error (exit 2), never ignored. `--key value` after the positionals win over all
of it. STEADYVLA_DRY_RUN=1 prints the command instead of running it. The run is supervised
(`steadyvla.supervise`): a death is explained, and `restart_on_failure: N` restarts it.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
EXIT_USAGE = 2


@dataclass(frozen=True)
class Profile:
    nproc: int
    batch_size: int
    grad_accumulation_steps: int


SERVER_PROFILES = {"4090_1gpu": Profile(1, 2, 4), "v100_8gpu": Profile(8, 1, 8)}
DEFAULT_CONFIGS = {"method": "configs/method_icsm_hsw_thermostat.yaml", "baseline": "configs/baseline_lora.yaml",
                   "full": "configs/full_train.yaml"}
SCRIPTS = {"method": "scripts/run_method_train.sh", "baseline": "scripts/run_baseline_lora.sh",
           "full": "scripts/run_full_train.sh"}
VERBS = {"method": "finetune", "baseline": "finetune", "full": "train"}  # the steadyvla verb each kind runs
ENV_NAMES = ("CONFIG", "SERVER_PROFILE", "BATCH_SIZE", "GRAD_ACCUM", "PROBE_BATCH_SIZE", "THERMO_UPDATE", "THERMO_WARMUP",
             "RESUME_ADAPTER", "RESUME_STEP", "PRETRAINED_CHECKPOINT", "RESUME_EPOCH", "CLEAN_STALE_GPU_PROCS")
POSITIONALS = (("TARGET_STEPS", "max_steps"), ("SAVE_STEPS", "save_steps"), ("EVAL_EVERY", "eval_every_steps"),
               ("PATIENCE", "early_stopping_patience"))
ENV_INT_KEYS = {"BATCH_SIZE": "batch_size", "GRAD_ACCUM": "grad_accumulation_steps", "RESUME_STEP": "resume_global_step"}
# full training (`steadyvla train`): the users' train.py resume keys
FULL_ENV_INT_KEYS = {"BATCH_SIZE": "batch_size", "GRAD_ACCUM": "grad_accumulation_steps", "RESUME_STEP": "resume_step",
                     "RESUME_EPOCH": "resume_epoch"}
FULL_POSITIONALS = POSITIONALS[:2]  # their full-training script switches no evaluation on (the YAML may)
METHOD_ENV_INT_KEYS = {"PROBE_BATCH_SIZE": "probe_batch_size", "THERMO_UPDATE": "thermostat_update_interval",
                       "THERMO_WARMUP": "thermostat_warmup_steps"}
PROBE_BATCH_DEFAULT = 4  # their launcher's default


class LaunchError(ValueError):
    """A launcher argument or environment value is not understood (names it, its value, what is valid)."""


def _int(name: str, raw: str, minimum: int) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise LaunchError(f"{name}={raw!r}: expected an integer >= {minimum}")
    return value


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _profile(env: dict[str, str], config: Path) -> tuple[str, Profile] | None:
    name = env.get("SERVER_PROFILE")
    source = "SERVER_PROFILE"
    if not name:
        name = (yaml.safe_load(config.read_text()) or {}).get("server_profile")
        source = f"{config}: server_profile"
    if not name:
        return None
    if name not in SERVER_PROFILES:
        raise LaunchError(f"{source}={name!r}: not a known profile; valid: {', '.join(SERVER_PROFILES)}")
    return name, SERVER_PROFILES[name]


def build_command(kind: str, argv: list[str], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """(command, notes) for `kind` (method | baseline | full) from the launcher's arguments and environment."""
    full = kind == "full"
    names = FULL_POSITIONALS if full else POSITIONALS
    split = next((i for i, a in enumerate(argv) if a.startswith("--")), len(argv))
    positionals, extra = argv[:split], argv[split:]
    if len(positionals) > 1 + len(names):
        raise LaunchError(f"too many positional arguments {positionals}; expected [NPROC|auto] "
                          + " ".join(f"[{name}]" for name, _ in names) + " [--key value ...]")
    config = Path(env.get("CONFIG") or REPO / DEFAULT_CONFIGS[kind])
    if not config.is_file():
        raise LaunchError(f"CONFIG={str(config)!r}: file not found")
    notes: list[str] = []
    profile = _profile(env, config)
    overrides: dict[str, object] = {}
    if profile:
        overrides.update(batch_size=profile[1].batch_size, grad_accumulation_steps=profile[1].grad_accumulation_steps)
        notes.append(f"server profile {profile[0]}: {profile[1].nproc} process(es), batch {profile[1].batch_size}, "
                     f"accumulation {profile[1].grad_accumulation_steps}")
    int_keys = FULL_ENV_INT_KEYS if full else dict(ENV_INT_KEYS, **(METHOD_ENV_INT_KEYS if kind == "method" else {}))
    for name, key in int_keys.items():
        if env.get(name):
            overrides[key] = _int(name, env[name], 0 if name in ("RESUME_STEP", "RESUME_EPOCH", "THERMO_WARMUP") else 1)
    for name in METHOD_ENV_INT_KEYS:
        if kind != "method" and env.get(name):
            who = "the full-training launcher takes the method's keys from the YAML only" if full else \
                "the baseline has no probe or Thermostat"
            raise LaunchError(f"{name}={env[name]!r}: {who}; unset it or use scripts/run_method_train.sh")
    if kind == "method":
        overrides.setdefault("probe_batch_size", PROBE_BATCH_DEFAULT)
    for name in (("RESUME_ADAPTER",) if full else ("PRETRAINED_CHECKPOINT", "RESUME_EPOCH")):
        if env.get(name):
            other = "PRETRAINED_CHECKPOINT (a checkpoint dir, a run dir or a model file)" if full else "RESUME_ADAPTER"
            raise LaunchError(f"{name}={env[name]!r}: not used by the {kind} launcher; use {other}")
    if env.get("RESUME_ADAPTER"):
        overrides["resume_adapter_dir"] = env["RESUME_ADAPTER"]
    if env.get("PRETRAINED_CHECKPOINT"):
        overrides["pretrained_checkpoint"] = env["PRETRAINED_CHECKPOINT"]
    clean = env.get("CLEAN_STALE_GPU_PROCS")
    if clean not in (None, "", "0", "1"):
        raise LaunchError(f"CLEAN_STALE_GPU_PROCS={clean!r}: expected 0 or 1")
    if clean == "1":
        notes.append("CLEAN_STALE_GPU_PROCS=1: nothing to clean; a run dir is owned by one process at a time and a "
                     "second start is refused naming the owner")
    nproc_arg = positionals[0] if positionals else None
    if nproc_arg is None and profile:
        nproc = profile[1].nproc
    elif nproc_arg in (None, "auto"):
        nproc = max(1, _gpu_count())
    else:
        nproc = _int("NPROC", nproc_arg, 1)
    for (name, key), raw in zip(names, positionals[1:]):
        overrides[key] = _int(name, raw, 1)
    if not full:  # as the users' LoRA launchers do
        overrides.update(enable_periodic_eval=True, early_stopping_enabled=True)
    flags = [part for key, value in overrides.items() for part in (f"--{key}", _yaml_scalar(value))]
    verb = ["-m", "steadyvla.cli", VERBS[kind], "--config", str(config), *flags, *extra]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(nproc), *verb], notes
    return [sys.executable, *verb], notes


def _yaml_scalar(value: object) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def main(argv: list[str] | None = None) -> int:
    """`python -m steadyvla.launch method|baseline|full ARGS...`: run (or with STEADYVLA_DRY_RUN=1 print) it."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in DEFAULT_CONFIGS:
        given = repr(argv[0]) if argv else "nothing"
        print(f"error: launcher kind: {given} is not one of {', '.join(DEFAULT_CONFIGS)}; usage: steadyvla launch "
              f"{{{'|'.join(DEFAULT_CONFIGS)}}} [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [EVAL_EVERY] [PATIENCE] "
              "[--key value ...]", file=sys.stderr)
        return EXIT_USAGE
    try:
        command, notes = build_command(argv[0], argv[1:], dict(os.environ))
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    dry_run = os.environ.get("STEADYVLA_DRY_RUN", "")
    if dry_run not in ("", "0", "1"):
        print(f"error: STEADYVLA_DRY_RUN={dry_run!r}: expected 0 or 1", file=sys.stderr)
        return EXIT_USAGE
    for note in notes:
        print(f"[steadyvla] {note}", flush=True)
    if dry_run == "1":
        print(shlex.join(command))
        return 0
    return _supervised(argv[0], argv[1:], command)


def resume_command(kind: str, argv: list[str], env: dict[str, str]) -> str:
    """The exact launcher command line that continues the run (its environment overrides included)."""
    prefix = [f"{name}={shlex.quote(env[name])}" for name in ENV_NAMES if env.get(name)]
    return " ".join([*prefix, SCRIPTS[kind], *map(shlex.quote, argv)])


def _supervised(kind: str, argv: list[str], command: list[str]) -> int:
    from steadyvla.config import ConfigError, load_config, parse_overrides
    from steadyvla.supervise import supervise
    from steadyvla.train.run_dir import run_dir_for

    at = command.index(VERBS[kind])
    try:
        cfg = load_config(command[at + 2], parse_overrides(command[at + 3:]))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return supervise(command, run_dir=run_dir_for(cfg), restarts=cfg.restart_on_failure,
                     backoff_s=cfg.restart_backoff_s, resume_command=resume_command(kind, argv, dict(os.environ)),
                     log=lambda message: print(message, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
