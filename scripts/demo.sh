#!/usr/bin/env bash
# Set up a virtual environment with gcbackend (NumPy only) and run the course notebook's demo.
# Extra arguments go to `gcbackend demo`, e.g.  scripts/demo.sh --backend torch
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GCBACKEND_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e .
"$VENV/bin/gcbackend" demo "$@"
