#!/usr/bin/env bash
# Create (or reuse) .venv and install senseflow with its test extras.
# torch is pinned through constraints.txt to the local CPU build: an unpinned torch pulls GBs of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.senseflow-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # pip's notes about unusable local index paths on some machines are noise: keep real errors only
  quiet() { "$@" 2> >(grep -v -e "WARNING: Location 'file:" -e "BuildBackendWarning" >&2); }
  quiet .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  quiet .venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
  quiet .venv/bin/python -m pip install -q -c constraints.txt -e ".[test,lora]"
  echo "$want" > "$stamp"
fi
