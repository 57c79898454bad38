#!/usr/bin/env bash
# The one entry point. It sets itself up on a fresh machine (a virtual environment in .venv), then runs:
#   bash run.sh demo          the main job on the embedded default
#   bash run.sh test [ARGS]   the test suite (pytest ARGS)
#   bash run.sh ARGS          any other hf-fastattn command (bench, diagnose, ...)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${HF_FASTATTN_VENV:-.venv}
PINS=${HF_FASTATTN_PINS:-}  # extra requirements installed with the package, e.g. "transformers==5.17.0" (CI's floor)
PY="$VENV/bin/python"
stamp="$VENV/.hf-fastattn-$( (cat pyproject.toml; echo "$PINS") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # Pin torch first: on these machines torch==2.13.0 is a local CPU wheel, a bare range pulls CUDA (GBs).
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${HF_FASTATTN_TORCH:-2.13.0}"
  # shellcheck disable=SC2086  # PINS is a list of requirements
  "$PY" -m pip install -q -e ".[test]" $PINS
  touch "$stamp"
fi
cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) exec "$PY" -m pytest "$@" ;;
  *) exec "$VENV/bin/hf-fastattn" "$cmd" "$@" ;;
esac
