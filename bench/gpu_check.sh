#!/usr/bin/env bash
# The GPU paths on one GPU machine, in one pass of about 9 minutes with the default BUDGET,
# 15 at most (the steps' limits)
# (on one H200 with 16 cores, 2026-12-04: prepare 12 s; each training job ~50 s from start to
# its first step, the first epoch of the GPU preset 46 s and a retried one 20 s; the CUDA test's
# two training jobs and two scoring jobs took more than 115 s):
#
#   bench/gpu_check.sh                                     # ../shared/datasets/fer2013, runs/gpu_check
#   FER=/data/fer2013 OUT=/tmp/gpu BUDGET=30 WEIGHTS="--pretrained-file r50.safetensors" bench/gpu_check.sh
#
# 1. bench/accuracy.sh with the GPU preset (configs/fer2013-gpu.yaml, --use-gpu): prepare,
#    train for BUDGET minutes (--time-budget fits the cosine schedule to them, start-up
#    included), score val on the GPU in fp32 without TTA, with flip and with ten-crop TTA. WEIGHTS
#    defaults to training from scratch (a machine without internet has no ImageNet weights);
#    WEIGHTS="" takes them from the timm hub, "--pretrained-file PATH" from a file.
# 2. bench/bench_scoring.py --use-gpu with the model it trained: jobs/predict.py against a
#    plain DataLoader loop on the GPU, and peak memory on train/ against val/.
# 3. tests/test_gpu_paths.py, whose CUDA test trains in fp16, resumes in bf16 and checks GPU
#    scoring against the CPU's.
# nvidia-smi samples the GPU's load and memory every 2 s into OUT/gpu_load.csv meanwhile.
# Each step has its own time limit and log (OUT/*.log); a failed step does not stop the next.
# The last lines are each step's result.
set -uo pipefail
cd "$(dirname "$0")/.."

FER=${FER:-../shared/datasets/fer2013}
OUT=${OUT:-runs/gpu_check}
BUDGET=${BUDGET:-2.5}
WEIGHTS=${WEIGHTS---no-pretrained --freeze-epochs 0}
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PY

if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "skipped: torch sees no CUDA GPU here"
  exit 0
fi
if [ -e "$OUT/acc/run" ]; then  # (its scoring step would score that run's model as this one's)
  echo "error: $OUT/acc/run exists, from a check before; remove $OUT (or set OUT=...)" >&2
  exit 1
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PY" -c "import torch, timm, ray, albumentations as A; print('torch', torch.__version__, 'timm', timm.__version__, 'ray', ray.__version__, 'albumentations', A.__version__)"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu_load.csv" 2>/dev/null &
smi=$!
trap 'kill $smi 2>/dev/null' EXIT

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, keep its last line
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  # Ctrl-C at the limit: a training job saves and exits 130, pytest prints what failed.
  timeout -s INT -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s: $(tail -n 1 "$OUT/$name.log")" >> "$OUT/results.txt"
  tail -n 1 "$OUT/results.txt"
}

: > "$OUT/results.txt"
# shellcheck disable=SC2086  # WEIGHTS is a list of flags
step accuracy "$(awk -v b="$BUDGET" 'BEGIN { print int(b * 60 + 240) }')" env FER="$FER" OUT="$OUT/acc" CONFIG=configs/fer2013-gpu.yaml \
  EXTRA="--use-gpu $WEIGHTS --time-budget $BUDGET" SCORE_FLAGS="--use-gpu --amp off" bench/accuracy.sh
if [ -d "$OUT/acc/run/best" ]; then
  step scoring 180 "$PY" bench/bench_scoring.py --use-gpu --model "$OUT/acc/run/best" --data "$FER"
fi
step tests 300 "$PY" -m pytest -q -p no:cacheprovider -rfE tests/test_gpu_paths.py
echo "--- results"
cat "$OUT/results.txt"
