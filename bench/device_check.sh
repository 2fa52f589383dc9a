#!/usr/bin/env bash
# The GPU checks, in parts that fit the lent device (one call may run 10 minutes; each call below is planned
# for about 7, cheapest and most informative first). Run from the repository root:
# (measured 2026-11-26 on an H100: a 19 s to the first failure, b 52 s, c 108 s, d 59 s, plus ~30 s start)
#
#   call 1:  bash bench/device_check.sh a t b   (~1.5 + ~1.5 + ~2 min; b took 52 s on an H100)
#   call 2:  bash bench/device_check.sh c d     (~3 + ~3 min)
#
#   a  kernel and trainer-path tests on CUDA (real Triton, not the interpreter): logprobs, GRPO loss, NLL,
#      layouts / upstream gradients / autocast dtypes, packing, packed attention, the trainer's steps  [240 s cap]
#   t  row-kernel launch sweep (BLOCK_V x warps) and tile heights (bench/tune_rows.py); b then uses the best  [200 s cap]
#   b  GRPO-loss benchmark at the TARGETS.md shape (M=8192, H=4096, V=151936, bf16) against torch eager,
#      torch.compile, Liger-Kernel (chunked and triton_grpo_loss) and one cuBLAS matmul  [330 s cap]
#   c  CUDA training smoke: exgrpo ei (arithmetic, symbolic teacher) -> exgrpo sft (4 steps) -> exgrpo train
#      (3 steps) on a random-init Qwen2.5-0.5B-shaped student (fp32 master weights, bf16 autocast, transformers
#      generation), under torchrun (NCCL + gloo process group); step time split, peak memory, log-prob
#      mismatch; plus the old CUDA-only process group failing on a CPU scalar, for the record  [300 s cap]
#   d  training-step benchmark (Qwen2-0.5B / 1.5B shapes: packed + fused vs padded + full logits) and the
#      packing benchmark  [270 s cap]
#
# Results go to $OUT (the device tool returns at most 8 files a call); commit them under bench/results/ with the
# card, versions and date. Liger-Kernel is not in the GPU image: carry its wheel (pure Python) in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${*:-a t b c d}
OUT=${OUT:-bench/results/device-$(date -u +%Y%m%d)}
W=/tmp/exgrpo-device
mkdir -p "$OUT" "$W" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
# the native backend is the CPU's (built by pip install through CMake); this image runs the checkout as is: the
# Triton kernels serve CUDA, the torch twins any CPU tensor, and tests/test_native.py knows not to expect _C
export EXGRPO_NO_NATIVE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
fi
ln -sfn "$PWD/kernels" /tmp/site/exgrpo_kernels   # the package's import name, as setup.py maps it
LOG="$OUT/log_${PARTS// /}.txt"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import liger_kernel; from importlib.metadata import version; print('liger-kernel', version('liger-kernel'))" 2>&1 | tail -1
} 2>&1 | tee "$LOG"

for part in $PARTS; do
  t0=$(date +%s)
  case $part in
  a)
    timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_logprobs.py tests/test_grpo_loss.py \
      tests/test_kernel_layouts.py tests/test_packing_kernel.py tests/test_packed_attention.py tests/test_cuda_path.py \
      > "$OUT/tests.txt" 2>&1
    echo "part a: pytest exit $?" | tee -a "$LOG"; tail -n 15 "$OUT/tests.txt" | tee -a "$LOG" ;;
  t)
    timeout 200 python3 bench/tune_rows.py --out "$OUT/tune_rows.json" 2>&1 | tee "$W/tune.txt" | tail -n 12 | tee -a "$LOG"
    grep '^export' "$W/tune.txt" | tail -n 1 > "$W/best.env" ;;
  b)
    [ -s "$W/best.env" ] && . "$W/best.env" && echo "row kernels: $(cat $W/best.env)" | tee -a "$LOG"
    timeout 330 python3 bench/bench_grpo_loss.py --preset targets --out "$W/targets" 2>&1 | tee -a "$LOG"
    cp "$W/targets/results.json" "$OUT/grpo_loss.json"; cp "$W/targets/results.csv" "$OUT/grpo_loss.csv"
    cp "$W/targets/results.png" "$OUT/grpo_loss.png" ;;
  c)
    S=$W/smoke; rm -rf "$S"
    RUN="timeout 280 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m exgrpo"
    python3 -m exgrpo ei limit=64 rules_per_example=2 out_dir=$S/ei > "$S.ei.txt" 2>&1 || tail -n 20 "$S.ei.txt"
    $RUN sft data=$S/ei/d_ei.jsonl model.preset=qwen2.5-0.5b max_steps=4 batch_dialogues=32 \
      optim.warmup_steps=0 out_dir=$S/sft progress=false 2>&1 | grep -v Warning | tail -n 5 | tee -a "$LOG"
    $RUN train data=$S/ei/d_ei.jsonl init=$S/sft/final model.preset=qwen2.5-0.5b steps=3 questions_per_step=8 G=4 \
      k=2 k_partial=1 backend=transformers sampling.max_new_tokens=48 out_dir=$S/train progress=false 2>&1 \
      | grep -v Warning | tail -n 5 | tee -a "$LOG"
    cp "$S/sft/metrics.jsonl" "$OUT/smoke_sft_metrics.jsonl"; cp "$S/train/metrics.jsonl" "$OUT/smoke_train_metrics.jsonl"
    python3 - "$S" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
for name in ("sft", "train"):
    for r in (json.loads(x) for x in open(f"{sys.argv[1]}/{name}/metrics.jsonl")):
        keep = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in (
            "step", "loss", "grad_norm", "tokens_per_s", "peak_mem_gib", "time_gen_s", "time_train_s", "reward_base_A",
            "gen_logp_abs_diff_mean", "gen_logp_abs_diff_max", "kl", "skipped", "skipped_zero_adv")}
        print(name, keep)
EOF
    # the defect this replaced: a CUDA-only (NCCL) group cannot reduce the trainer's CPU scalars
    cat > "$W/old_pg.py" <<'EOF'
import torch, torch.distributed as dist
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
try:
    dist.all_reduce(torch.ones(1, dtype=torch.float64)); print("old nccl-only group + CPU scalar: ok")
except Exception as e:
    print("old nccl-only group + CPU scalar: fails:", type(e).__name__, str(e).splitlines()[0][:120])
dist.destroy_process_group()
EOF
    timeout 60 python3 -m torch.distributed.run --standalone --nproc_per_node 1 "$W/old_pg.py" 2>&1 | grep "^old" | tee -a "$LOG"
    ;;
  d)
    timeout 150 python3 bench/bench_train_step.py --out "$W/train-step" 2>&1 | tail -n 8 | tee -a "$LOG"
    timeout 120 python3 bench/bench_packing.py --out "$W/packing" 2>&1 | tail -n 12 | tee -a "$LOG"
    cp "$W/train-step/results.json" "$OUT/train_step.json"; cp "$W/train-step/results.png" "$OUT/train_step.png"
    cp "$W/packing/results.json" "$OUT/packing.json"; cp "$W/packing/results.png" "$OUT/packing.png" ;;
  *) echo "unknown part $part (a b c d)" | tee -a "$LOG" ;;
  esac
  echo "part $part took $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
done
ls -la "$OUT"
