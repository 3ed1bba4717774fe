#!/usr/bin/env bash
# Usage: scripts/run_full_train.sh [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS] [--key value ...]
# Full-parameter training (`steadyvla train`: FSDP2 or DDP), torchrun --standalone for NPROC > 1.
# Env: CONFIG (default configs/full_train.yaml), SERVER_PROFILE, BATCH_SIZE, GRAD_ACCUM,
# PRETRAINED_CHECKPOINT (checkpoint dir, run dir or model file), RESUME_STEP, RESUME_EPOCH (checked against the
# checkpoint's own record), CLEAN_STALE_GPU_PROCS, STEADYVLA_DRY_RUN=1 (print the command only).
# Several nodes: README "Multi-node" (torchrun rendezvous flags, SLURM).
exec "$(dirname "$0")/_launch.sh" full "$@"
