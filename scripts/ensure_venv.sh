# Sourced by run_local.sh and run_tests.sh: make .venv and install the project.
#
# Installs the pinned set in constraints.txt into .venv (or $VENV) once, and
# again whenever setup.py or constraints.txt change. Needs Python 3.10-3.12
# (3.11 preferred: the pins were resolved with it) and access to PyPI.
set -euo pipefail

VENV=${VENV:-.venv}
# Extras installed: run_tests.sh adds the vector-store clients (stores) so
# every store test runs; run_local.sh keeps the lean install.
VENV_EXTRAS=${VENV_EXTRAS:-test,samples}
if [ -z "${PYTHON:-}" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
"${PYTHON:?no python3 found; set PYTHON=/path/to/python3.11}" - <<'PY' || { echo "error: need Python 3.10-3.12, got $($PYTHON -V 2>&1)" >&2; exit 2; }
import sys
sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)
PY

stamp_of_inputs=$(cat setup.py constraints.txt | sha256sum | cut -c1-16)
# One stamp per set of extras: switching between run_local.sh (lean) and
# run_tests.sh (stores) installs each set once, not at every switch.
stamp="$VENV/.installed-$stamp_of_inputs-${VENV_EXTRAS//,/-}"
if [ ! -f "$stamp" ]; then
  echo "setting up $VENV with $($PYTHON -V 2>&1) (first run takes a few minutes)..." >&2
  [ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[$VENV_EXTRAS]"
  find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$stamp_of_inputs-*" -delete
  touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
