#!/usr/bin/env bash
# One-shot GPU suite (issue #16 item 5): on ONE GPU, <= 8 minutes, JSON + Markdown table.
#
#   benchmarks/gpu_suite.sh WHEELS_DIR [OUT_DIR]     # GPU machine
#   benchmarks/gpu_suite.sh --dry-run [OUT_DIR]      # CPU: plumbing check on the tiny preset (CI)
#
# The GPU machines have torch + transformers but NO diffusers and no network (see
# /work/shared/ENVIRONMENT.md), so the wheels senseflow needs there are carried in WHEELS_DIR,
# made on a machine with PyPI access:
#   pip download --no-deps -d wheels/ diffusers==0.42.1 pydantic==2.14.* pydantic-core omegaconf \
#       antlr4-python3-runtime safetensors
# They are installed with --no-index --no-deps (torch is never touched) and senseflow runs from
# src/ (PYTHONPATH), not installed.  Results: OUT_DIR/suite.json, OUT_DIR/suite.md (default runs/gpu_suite).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [[ ${1:-} == --dry-run ]]; then
  exec "$PY" benchmarks/gpu_suite.py --dry-run --out "${2:-runs/gpu_suite_dry}"
fi
WHEELS=${1:?usage: benchmarks/gpu_suite.sh WHEELS_DIR [OUT_DIR]  (or --dry-run)}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if (( ${#wheels[@]} )); then
  "$PY" -m pip install --quiet --no-index --no-deps "${wheels[@]}"
fi
"$PY" -c "import diffusers, senseflow" || { echo "gpu_suite: diffusers/senseflow do not import: carry their wheels in $WHEELS" >&2; exit 2; }
exec "$PY" benchmarks/gpu_suite.py --out "${2:-runs/gpu_suite}"
