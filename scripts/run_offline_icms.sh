#!/usr/bin/env bash
# Usage: scripts/run_offline_icms.sh [--key value ...]  Build the ICSM artifacts (the method's offline step).
# Takes the users' offline_icms.py option names too: --r --epsilon (absolute) --fragile_dim --plastic_dim
# --max_samples --sensitivity_samples --layer_ids --batch_size. Env: CONFIG (default
# configs/method_icsm_hsw_thermostat.yaml).
set -euo pipefail
if [ -n "${CONFIG:-}" ]; then CONFIG=$(realpath "$CONFIG"); fi
cd "$(dirname "$0")/.."
exec "${STEADYVLA_BIN:-.venv/bin}/python" -m steadyvla.cli icsm build \
  --config "${CONFIG:-configs/method_icsm_hsw_thermostat.yaml}" "$@"
