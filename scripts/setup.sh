#!/usr/bin/env bash
# Create .venv (once) and install the project with its test and demo extras into it.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (pip skips what is installed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VQT_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.vq-transplant-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "[setup] installing vq-transplant and its dependencies into $venv (first run: several minutes, ~6 GB)"
  # torch is pinned to the newest release the project is tested with. pip takes it from a local wheel cache when
  # one is configured, else from the package index.
  "$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
  "$venv/bin/python" -m pip install --quiet -e "$root[test,demo]"
  touch "$stamp"
fi
export PATH="$venv/bin:$PATH"
# Runs never download: hub look-ups fail at once instead of retrying for a minute.
export HF_HUB_OFFLINE=1
