#!/usr/bin/env bash
# Shared body of scripts/run_*.sh: _launch.sh method|baseline|full [NPROC|auto] [TARGET_STEPS] [SAVE_STEPS]
# [EVAL_EVERY] [PATIENCE] [--key value ...]; environment overrides in src/steadyvla/launch.py.
# Runs from the repository root (the shipped configs' relative paths); CONFIG is resolved first.
set -euo pipefail
if [ -n "${CONFIG:-}" ]; then CONFIG=$(realpath "$CONFIG"); export CONFIG; fi
cd "$(dirname "$0")/.."
exec "${STEADYVLA_BIN:-.venv/bin}/python" -m steadyvla.launch "$@"
