#!/usr/bin/env bash
# Set up the environment (first run: a few minutes) and run the test suite.
#   ./run_tests.sh                 everything
#   ./run_tests.sh -k resume -x    any pytest arguments
# Tests that need ../shared (real photos, real-weights models) skip with the
# reason where it is absent; the rest always run.
set -euo pipefail
cd "$(dirname "$0")"
VENV_EXTRAS=${VENV_EXTRAS:-test,samples,stores} source scripts/ensure_venv.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec python -m pytest "$@"
