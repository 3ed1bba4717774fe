#!/usr/bin/env bash
# Create .venv and install steadyvla with the demo (MetaWorld), RLDS, video, llama, wandb, plot and test extras.
# On a machine without a GPU, MuJoCo renders the demo with OSMesa (Debian/Ubuntu: libosmesa6);
# as root this script installs it, otherwise it tells you the command.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -e /dev/nvidia0 ] && ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing libosmesa6 (software OpenGL for MuJoCo rendering without a GPU)"
    apt-get update -qq >/dev/null && apt-get install -y -qq libosmesa6 >/dev/null
  else
    echo "[setup] MuJoCo needs software OpenGL here: run 'sudo apt-get install libosmesa6'" >&2
  fi
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
echo "[setup] installing steadyvla into .venv (torch, transformers, peft, timm, metaworld, ...)"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[demo,rlds,video,llama,wandb,plot,test]"
.venv/bin/python -c "import steadyvla, torch, timm, peft, metaworld, matplotlib; print('[setup] ok: torch', torch.__version__)"
