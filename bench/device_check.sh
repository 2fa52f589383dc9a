#!/usr/bin/env bash
# The GPU checks, in parts that fit the lent device (one call may run 10 minutes; plan about 7 per call), cheapest
# and most informative first. Run from the repository root:
#
#   call 1:  bash bench/device_check.sh a b     (~3 + ~4 min)
#   call 2:  bash bench/device_check.sh c d     (~3 + ~4 min)
#   t (the row-kernel launch sweep, ~3 min) when the row kernels change; b then uses its best configuration
#
#   a  the CUDA test suite: every test file that runs without vLLM and flash-attn, on real Triton (not the
#      interpreter), stopping at the first failure  [330 s cap]
#   b  GRPO-loss benchmark at the reference shape (M=8192, H=4096, V=151936, bf16) against torch eager,
#      torch.compile, Liger-Kernel and one cuBLAS matmul, then again with every token in the loss (--all-active)
#      [2 x 170 s cap]
#   c  the whole step against TRL's GRPOTrainer at the Qwen2.5-0.5B shape (bench/bench_e2e.py --preset gpu)
#      [330 s cap]
#   d  training smoke under torchrun (NCCL + gloo): exgrpo ei -> sft (4 steps) -> train (3 steps) on a random-init
#      Qwen2.5-0.5B-shaped student, with `exgrpo plan`'s prediction beside torch.cuda.max_memory_allocated for both;
#      FSDP2 on one rank over NCCL (2 steps); SFT with gradient checkpointing + activation offloading (2 steps, its
#      plan beside it); the packing benchmark  [330 s cap]
#   t  row-kernel launch sweep (BLOCK_V x warps) and tile heights (bench/tune_rows.py)  [200 s cap]
#
# DRY_RUN=1 runs every part on the CPU at smoke sizes (Triton interpreter, tiny models): CI does (tests/
# test_bench_scripts.py), so the script cannot rot between GPU sessions. Results go to $OUT; commit them under
# bench/results/<card>-<date>/. Liger-Kernel and TRL are not in the GPU image: carry their wheels (pure Python) in
# .whl/:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl liger-kernel==0.8.5 trl==1.16.0 accelerate datasets
set -uo pipefail
cd "$(dirname "$0")/.."
PARTS=${*:-a b c d}
DRY=${DRY_RUN:-0}
OUT=${OUT:-bench/results/device-$(date -u +%Y%m%d)}
W=${WORK:-/tmp/exgrpo-device}
mkdir -p "$OUT" "$W" /tmp/site
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 EXGRPO_KERNEL_BACKEND=triton
else
  # the GPU image runs the checkout as is: the Triton kernels serve CUDA, the torch twins any CPU tensor
  export EXGRPO_NO_NATIVE=1
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  fi
  ln -sfn "$PWD/kernels" /tmp/site/exgrpo_kernels   # the package's import name, as pyproject.toml maps it
fi
LOG="$OUT/log_${PARTS// /}.txt"
{ date -u; command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$LOG"

if [ "$DRY" = 1 ]; then  # smoke sizes: the same commands, seconds each
  TESTS="tests/test_packed_attention.py tests/test_generation.py"
  LOSS="--preset smoke --reps 1 --warmup 0 --skip compile"
  E2E="--preset smoke"
  SMOKE_MODEL="model.hidden_size=64 model.intermediate_size=128 model.num_layers=2"
  NPROC=1; MAXNEW=8; TRAIN_TOKENS="--train-tokens 256 --dialogues 128"
  RL_SIZE="steps=1 questions_per_step=2 G=2"  # the training step runs in the Triton interpreter: keep it small
else
  TESTS=$(ls tests/test_*.py | grep -v -e test_vllm -e test_teacher_server -e test_bench_scripts | tr '\n' ' ')
  LOSS="--preset targets"
  E2E="--preset gpu"
  SMOKE_MODEL="model.preset=qwen2.5-0.5b"
  NPROC=1; MAXNEW=48; TRAIN_TOKENS=""
  RL_SIZE="steps=3 questions_per_step=8 G=4"
fi

for part in $PARTS; do
  t0=$(date +%s)
  case $part in
  a)
    timeout 330 $PY -m pytest -q -x -p no:cacheprovider $TESTS > "$OUT/tests.txt" 2>&1
    echo "part a: pytest exit $?" | tee -a "$LOG"; tail -n 15 "$OUT/tests.txt" | tee -a "$LOG" ;;
  t)
    timeout 200 $PY bench/tune_rows.py $([ "$DRY" = 1 ] && echo --smoke) --out "$OUT/tune_rows.json" 2>&1 \
      | tee "$W/tune.txt" | tail -n 12 | tee -a "$LOG"
    grep '^export' "$W/tune.txt" | tail -n 1 > "$W/best.env" ;;
  b)
    [ -s "$W/best.env" ] && . "$W/best.env" && echo "row kernels: $(cat "$W/best.env")" | tee -a "$LOG"
    timeout 170 $PY bench/bench_grpo_loss.py $LOSS --out "$W/loss" 2>&1 | tail -n 30 | tee -a "$LOG"
    timeout 170 $PY bench/bench_grpo_loss.py $LOSS --all-active --out "$W/loss_all" 2>&1 | tail -n 30 | tee -a "$LOG"
    for d in loss loss_all; do for f in results.json results.csv results.png; do
      cp "$W/$d/$f" "$OUT/grpo_${d}_$f"; done; done ;;
  c)
    timeout 330 $PY bench/bench_e2e.py $E2E --out "$W/e2e" 2>&1 | tail -n 6 | tee -a "$LOG"
    for f in results.json results.csv results.png; do cp "$W/e2e/$f" "$OUT/e2e_$f"; done ;;
  d)
    S=$W/smoke; rm -rf "$S"
    RUN="timeout 150 $PY -m torch.distributed.run --standalone --nproc_per_node $NPROC -m exgrpo"
    $PY -m exgrpo ei limit=64 rules_per_example=2 out_dir="$S/ei" > "$S.ei.txt" 2>&1 || tail -n 20 "$S.ei.txt"
    $RUN sft data="$S/ei/d_ei.jsonl" $SMOKE_MODEL max_steps=4 batch_dialogues=32 optim.warmup_steps=0 \
      out_dir="$S/sft" progress=false 2>&1 | grep -v Warning | tail -n 3 | tee -a "$LOG"
    $RUN train data="$S/ei/d_ei.jsonl" init="$S/sft/final" $SMOKE_MODEL $RL_SIZE k=2 \
      k_partial=1 backend=transformers sampling.max_new_tokens=$MAXNEW out_dir="$S/train" progress=false 2>&1 \
      | grep -v Warning | tail -n 3 | tee -a "$LOG"
    $RUN sft data="$S/ei/d_ei.jsonl" $SMOKE_MODEL max_steps=2 batch_dialogues=32 optim.warmup_steps=0 \
      parallel=fsdp2 out_dir="$S/fsdp2" progress=false 2>&1 | grep -v Warning | tail -n 3 | tee -a "$LOG"
    OFF="model.gradient_checkpointing=true model.activation_offload=true"
    timeout 120 $PY -m exgrpo sft data="$S/ei/d_ei.jsonl" $SMOKE_MODEL $OFF max_steps=2 batch_dialogues=32 \
      optim.warmup_steps=0 out_dir="$S/sft_offload" progress=false 2>&1 | grep -v Warning | tail -n 3 | tee -a "$LOG"
    $PY -m exgrpo plan $SMOKE_MODEL parallel=ddp world_size=1 beta=0.04 vllm_gpu_memory_utilization=0 \
      > "$S/plan.txt" 2>&1; tail -n 4 "$S/plan.txt" | tee -a "$LOG"
    $PY -m exgrpo plan $SMOKE_MODEL $OFF parallel=ddp world_size=1 beta=0 vllm_gpu_memory_utilization=0 \
      > "$S/plan_offload.txt" 2>&1; tail -n 5 "$S/plan_offload.txt" | tee -a "$LOG"
    cp "$S/plan_offload.txt" "$OUT/smoke_plan_offload.txt"
    $PY - "$S" <<'EOF' 2>&1 | tee "$OUT/smoke_summary.txt" | tee -a "$LOG"
import json, sys
for name in ("sft", "train", "fsdp2", "sft_offload"):
    rows = [json.loads(x) for x in open(f"{sys.argv[1]}/{name}/metrics.jsonl")]
    keys = ("step", "loss", "tokens_per_s", "peak_mem_gib", "time_step_s", "time_gen_s", "time_policy_s",
            "gen_logp_abs_diff_mean", "kl", "offload_tensors", "offload_host_gib")
    for r in rows:
        print(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keys})
EOF
    timeout 150 $PY bench/bench_packing.py $TRAIN_TOKENS --out "$W/packing" 2>&1 | tail -n 6 | tee -a "$LOG"
    cp "$S/sft/metrics.jsonl" "$OUT/smoke_sft_metrics.jsonl"; cp "$S/train/metrics.jsonl" "$OUT/smoke_train_metrics.jsonl"
    cp "$S/plan.txt" "$OUT/smoke_plan.txt"; cp "$W/packing/results.json" "$OUT/packing.json" ;;
  *) echo "unknown part $part (a b c d t)" | tee -a "$LOG" ;;
  esac
  echo "part $part took $(( $(date +%s) - t0 )) s" | tee -a "$LOG"
done
ls -la "$OUT"
