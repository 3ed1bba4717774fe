#!/usr/bin/env bash
# Shared body of scripts/run_*.sh: _finetune.sh CONFIG N [--key value ...]
# N = number of GPUs (processes); N > 1 runs data-parallel under torchrun. Re-running the same
# command resumes the run automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=$1; N=${2:-1}; shift 2 || shift $#
BIN=${STEADYVLA_BIN:-.venv/bin}
if [ "$N" -gt 1 ]; then
  exec "$BIN/torchrun" --standalone --nproc_per_node "$N" -m steadyvla.cli finetune --config "$CONFIG" "$@"
fi
exec "$BIN/steadyvla" finetune --config "$CONFIG" "$@"
