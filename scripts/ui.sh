#!/usr/bin/env bash
# Install if needed, then start the web UI on the embedded model: http://127.0.0.1:7860
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/studio ui "$@"
