#!/usr/bin/env bash
# Shared body of scripts/run_*.sh: _finetune.sh CONFIG N [--key value ...]
# N = number of GPUs. Re-running the same command resumes the run automatically.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=$1; N=${2:-1}; shift 2 || shift $#
STEADYVLA=${STEADYVLA:-.venv/bin/steadyvla}
if [ "$N" -gt 1 ]; then
  echo "error: N=$N: multi-GPU LoRA fine-tuning (torchrun + DDP/FSDP) is not available yet; use N=1" >&2
  exit 2
fi
exec "$STEADYVLA" finetune --config "$CONFIG" "$@"
