#!/usr/bin/env bash
# Create the side virtualenv with Axolotl 0.19.0 and a CPU torch, outside the repository.
# CPU torch first (on these machines `pip install torch==2.13.0` takes the CPU build from local disk),
# then axolotl, which keeps that torch. About 5 minutes. Re-running is a no-op when it is complete.
set -euo pipefail
VENV="${AXOLOTL_VENV:-/work/conformance-venv}"
PY="${PYTHON:-python3}"
if [ -x "$VENV/bin/axolotl" ] && "$VENV/bin/python" -c "import axolotl, sys; sys.exit(axolotl.__version__ != '0.19.0')" 2>/dev/null; then
  echo "axolotl 0.19.0 ready in $VENV"; exit 0
fi
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "axolotl==0.19.0"
"$VENV/bin/python" -c "import axolotl; print('axolotl', axolotl.__version__, 'ready in $VENV')"
