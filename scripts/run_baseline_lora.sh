#!/usr/bin/env bash
# Usage: scripts/run_baseline_lora.sh N [--key value ...]  (plain LoRA baseline)
exec "$(dirname "$0")/_finetune.sh" configs/baseline_lora.yaml "${1:-1}" "${@:2}"
