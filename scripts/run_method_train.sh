#!/usr/bin/env bash
# Usage: scripts/run_method_train.sh [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [EVAL_EVERY] [PATIENCE] [--key value ...]
# ICSM + HSW + Thermostat. Env: CONFIG (default configs/method_icsm_hsw_thermostat.yaml), SERVER_PROFILE
# (4090_1gpu | v100_8gpu), BATCH_SIZE, GRAD_ACCUM, PROBE_BATCH_SIZE (4), THERMO_UPDATE, THERMO_WARMUP,
# RESUME_ADAPTER, RESUME_STEP, CLEAN_STALE_GPU_PROCS, STEADYVLA_DRY_RUN=1 (print the command only).
exec "$(dirname "$0")/_launch.sh" method "$@"
