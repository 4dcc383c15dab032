#!/usr/bin/env bash
# Install if needed, then run the test suite (the long `-m slow` checks are left to benchmarks).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the browser test drives Debian's headless Chromium through Playwright
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "tests/test_browser.py needs Chromium: sudo apt-get install chromium" >&2
    fi
fi
# two workers, one thread each (a file's tests stay together, in order, on one worker); STUDIO_TEST_WORKERS=0
# runs them in this process
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${STUDIO_TEST_WORKERS:-2}" --dist loadfile "$@"
