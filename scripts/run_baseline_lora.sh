#!/usr/bin/env bash
# Usage: scripts/run_baseline_lora.sh [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [EVAL_EVERY] [PATIENCE] [--key value ...]
# Plain LoRA baseline. Env: CONFIG (default configs/baseline_lora.yaml), SERVER_PROFILE, BATCH_SIZE,
# GRAD_ACCUM, RESUME_ADAPTER, RESUME_STEP, CLEAN_STALE_GPU_PROCS, STEADYVLA_DRY_RUN=1.
exec "$(dirname "$0")/_launch.sh" baseline "$@"
