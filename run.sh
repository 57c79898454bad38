#!/usr/bin/env bash
# The one entry point. It sets itself up on a fresh machine (a virtual environment in .venv), then runs:
#   bash run.sh demo          the main job on the embedded default
#   bash run.sh test [ARGS]   the test suite (pytest ARGS, run from the repository root)
#   bash run.sh ARGS          any other hf-fastattn command (bench, diagnose, ...), run in the caller's directory,
#                             so relative paths in ARGS (--text my.txt, --out runs/x) mean what they say
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=${HF_FASTATTN_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac  # a relative HF_FASTATTN_VENV is relative to the repository
PINS=${HF_FASTATTN_PINS:-}  # extra requirements installed with the package, e.g. "transformers==5.17.0" (CI's floor)
PY="$VENV/bin/python"
stamp="$VENV/.hf-fastattn-$( (cat "$REPO/pyproject.toml"; echo "$PINS") | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x "$PY" ] || python3 -m venv "$VENV"
  "$PY" -m pip install -q --upgrade pip
  # Pin torch first: on these machines torch==2.13.0 is a local CPU wheel, a bare range pulls CUDA (GBs).
  "$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install -q "torch==${HF_FASTATTN_TORCH:-2.13.0}"
  # shellcheck disable=SC2086  # PINS is a list of requirements
  "$PY" -m pip install -q -e "$REPO[test]" $PINS
  touch "$stamp"
fi
cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  test) cd "$REPO" && exec "$PY" -m pytest "$@" ;;
  *) exec "$VENV/bin/hf-fastattn" "$cmd" "$@" ;;
esac
