#!/usr/bin/env bash
# The commands behind the CPU numbers and the memory estimates in docs/performance.md.
#
#   benchmarks/run_cpu_bench.sh            # all of it (~3 min on a 2-core machine)
#   benchmarks/run_cpu_bench.sh cpu        # only the tiny-preset CPU runs
#   benchmarks/run_cpu_bench.sh estimates  # only the memory estimates of the real presets
#
# JSON results go to $OUT (default runs/bench/cpu, git-ignored).  One intra-op thread: the tiny
# models' ops are too small to gain from threads, and the numbers stay comparable on a busy box.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/bench/cpu}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
mkdir -p "$OUT"
what=${1:-all}
bench() { "$PY" -m senseflow bench "$@"; echo; }

if [[ $what == all || $what == cpu ]]; then
  # 1. the target: framework overhead of the tiny preset, each method (30 timed iterations = 6 TTUR cycles)
  for method in senseflow dmd2 sid; do
    bench --preset tiny --method "$method" --precision fp32 --batch-size 2 --iterations 30 --warmup 2 \
      --compare-estimate --json "$OUT/tiny-$method-b2.json"
  done
  # 2. the same at batch 8 (the overhead is a fixed per-iteration cost: it shrinks as the model work grows)
  for method in senseflow dmd2 sid; do
    bench --preset tiny --method "$method" --precision fp32 --batch-size 8 --iterations 30 --warmup 2 \
      --json "$OUT/tiny-$method-b8.json"
  done
  # 3. the other tiny families, SenseFlow
  for preset in tiny-flux tiny-sdxl tiny-custom; do
    bench --preset "$preset" --method senseflow --precision fp32 --batch-size 2 --iterations 30 --warmup 2 \
      --compare-estimate --json "$OUT/$preset-senseflow-b2.json"
  done
fi

if [[ $what == all || $what == estimates ]]; then
  est() { bench --estimate-memory "$@"; }
  # SiD-DiT on SD3.5-Medium, 4 steps, 1024 px, pure bf16, batch 4 on one GPU (SiD-DiT reports 69 GB)
  est --preset sd35-medium --method sid --precision bf16 --batch-size 4 --gpus 1 --json "$OUT/est-sd35m-sid-b4.json"
  est --preset sd35-medium --method sid --precision bf16 --batch-size 4 --gpus 1 --activation-checkpointing \
    --json "$OUT/est-sd35m-sid-b4-ac.json"
  est --preset sd35-medium --method sid --precision bf16 --batch-size 4 --gpus 1 --activation-checkpointing \
    --checkpoint-teacher --json "$OUT/est-sd35m-sid-b4-ac-teacher.json"
  # SenseFlow at 1024 px, batch 1 per GPU
  est --preset sd35-medium --method senseflow --precision amp_bf16 --batch-size 1 --gpus 1 \
    --json "$OUT/est-sd35m-senseflow-b1.json"
  est --preset sd35-medium --method senseflow --precision bf16 --batch-size 1 --gpus 1 \
    --json "$OUT/est-sd35m-senseflow-b1-bf16.json"
  est --preset sd35-large --method senseflow --precision amp_bf16 --batch-size 1 --gpus 8 \
    --json "$OUT/est-sd35l-senseflow-b1-8gpu.json"
  est --preset sd35-large --method senseflow --precision amp_bf16 --batch-size 1 --gpus 8 --activation-checkpointing \
    --json "$OUT/est-sd35l-senseflow-b1-8gpu-ac.json"
  est --preset flux-dev --method senseflow --precision amp_bf16 --batch-size 1 --gpus 8 --activation-checkpointing \
    --json "$OUT/est-flux-senseflow-b1-8gpu-ac.json"
  est --preset sdxl --method dmd2 --precision amp_bf16 --batch-size 2 --gpus 8 \
    --json "$OUT/est-sdxl-dmd2-b2-8gpu.json"
fi
