#!/usr/bin/env bash
# Install if needed, then run the test suite (the long `-m slow` checks are left to benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
