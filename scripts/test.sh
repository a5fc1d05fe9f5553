#!/usr/bin/env bash
# Set up a virtual environment with the test extras (NumPy, array-api-strict, PyTorch CPU,
# pytest, Hypothesis, matplotlib, Dask for the client= tests) and run the whole test suite. Works from a clean clone with python3.
# Extra arguments go to pytest, e.g.  scripts/test.sh -k engine
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${GCBACKEND_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e '.[test]'
"$VENV/bin/python" -m pytest "$@"
