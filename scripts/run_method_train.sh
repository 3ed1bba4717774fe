#!/usr/bin/env bash
# Usage: scripts/run_method_train.sh N [--key value ...]  (ICSM + HSW + Thermostat)
exec "$(dirname "$0")/_finetune.sh" configs/method_icsm_hsw_thermostat.yaml "${1:-1}" "${@:2}"
