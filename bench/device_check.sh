#!/usr/bin/env bash
# One call on a lent GPU machine: the kernel tests on CUDA (real Triton, not the interpreter), then the
# GRPO-loss benchmark at the TARGETS.md shape with every peer, the training-step and packing benchmarks, and
# (SWEEP=1) the N/V sweep. Everything is written under /tmp/exgrpo-device; the essentials (at most 8 files, as
# the device tool returns) are copied to $OUT (default bench/results/device-DATE). Commit them to bench/results/
# with card, versions and date.
#
# Liger-Kernel is not in the GPU image: carry its wheel (pure Python) in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device-$(date -u +%Y%m%d)}
W=/tmp/exgrpo-device
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$LOG"
timeout 240 python3 -m pytest -q -x tests/test_logprobs.py tests/test_grpo_loss.py tests/test_packing_kernel.py \
  tests/test_packed_attention.py 2>&1 | tail -n 30 | tee -a "$LOG"
timeout 300 python3 bench/bench_grpo_loss.py --preset targets --out "$W/targets" 2>&1 | tee -a "$LOG"
timeout 200 python3 bench/bench_train_step.py --out "$W/train-step" 2>&1 | tail -n 20 | tee -a "$LOG"
timeout 240 python3 bench/bench_packing.py --out "$W/packing" 2>&1 | tail -n 40 | tee -a "$LOG"
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 400 python3 bench/bench_grpo_loss.py --preset sweep --skip liger --out "$W/sweep" 2>&1 | tee -a "$LOG"
fi
cp "$W/targets/results.json" "$OUT/grpo_loss.json" 2>/dev/null
cp "$W/targets/results.png" "$OUT/grpo_loss.png" 2>/dev/null
cp "$W/train-step/results.json" "$OUT/train_step.json" 2>/dev/null
cp "$W/packing/results.json" "$OUT/packing.json" 2>/dev/null
cp "$W/sweep/results.json" "$OUT/sweep.json" 2>/dev/null
cp "$W/sweep/results.png" "$OUT/sweep.png" 2>/dev/null
ls -la "$OUT"
