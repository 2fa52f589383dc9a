#!/usr/bin/env bash
# One call on a lent GPU machine: the kernel tests on CUDA (real Triton, not the interpreter), then the
# GRPO-loss benchmark at the TARGETS.md shape with every peer, then a reduced N/V sweep. Results under
# $OUT (default bench/results/device-DATE); commit them to bench/results/ with card, versions and date.
#
# Liger-Kernel is not in the GPU image: carry its wheel (pure Python) in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device-$(date -u +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
timeout 240 python3 -m pytest -q -x tests 2>&1 | tail -n 30 | tee "$OUT/tests.log"
timeout 300 python3 bench/bench_grpo_loss.py --preset targets --out "$OUT/targets" 2>&1 | tee "$OUT/bench.log"
timeout 240 python3 bench/bench_packing.py --out "$OUT/packing" 2>&1 | tail -n 40 | tee "$OUT/packing.log"
if [ "${SWEEP:-0}" = 1 ]; then
  timeout 400 python3 bench/bench_grpo_loss.py --preset sweep --skip liger --out "$OUT/sweep" 2>&1 | tee "$OUT/sweep.log"
fi
