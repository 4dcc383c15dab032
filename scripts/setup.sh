#!/usr/bin/env bash
# Create .venv and install studio with its test tools (idempotent; reinstalls when pyproject.toml changes).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/studio ] || [ pyproject.toml -nt .venv/.installed ]; then
  python3 -m venv .venv
  # torch first, pinned to the release this project is tested with (a CPU-capable CUDA build)
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q -e ".[dev]"
  touch .venv/.installed
fi
