#!/usr/bin/env bash
# The project's main job (README): installs what it needs, then runs the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
if .venv/bin/python -c "from senseflow.toy.teacher import TEACHER_ASSET as t; raise SystemExit(not (t / 'transformer').is_dir())"; then
  exec .venv/bin/senseflow demo "$@"
fi
# until the toy world ships its trained teacher: the tiny built-in example run
exec .venv/bin/senseflow train configs/examples/tiny_custom.yaml "$@"
