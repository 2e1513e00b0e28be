#!/usr/bin/env bash
# FER2013 accuracy of the 30-minute CPU preset, end to end:
#
#   bench/accuracy.sh                                  # ../shared/datasets/fer2013, runs/accuracy
#   FER=/path/to/fer2013 OUT=/tmp/acc bench/accuracy.sh
#   CONFIG=configs/fer2013-gpu.yaml EXTRA="--use-gpu" SCORE_FLAGS="--use-gpu --amp off" bench/accuracy.sh   # the GPU preset
#
# Prepares FER (train/ and val/ class folders) into Parquet shards, trains the preset
# (selection on val only: the test split is never seen), scores val with jobs/predict.py
# without TTA, with flip TTA and with ten-crop TTA, and prints on its last line:
#   val_acc=X val_macro_f1=X val_acc_tta=X val_macro_f1_tta=X val_acc_tencrop=X val_macro_f1_tencrop=X train_minutes=X
set -euo pipefail
# FER, OUT, CONFIG and PY given relative are taken from where the script was started; the
# defaults are relative to the repository.
here=$PWD
absolute() { case "$1" in /*) echo "$1" ;; *) echo "$here/$1" ;; esac; }
[ -n "${FER:-}" ] && FER=$(absolute "$FER")
[ -n "${OUT:-}" ] && OUT=$(absolute "$OUT")
[ -n "${CONFIG:-}" ] && CONFIG=$(absolute "$CONFIG")
[ -n "${PY:-}" ] && case "$PY" in */*) PY=$(absolute "$PY") ;; esac
cd "$(dirname "$0")/.."

FER=${FER:-../shared/datasets/fer2013}
OUT=${OUT:-runs/accuracy}
CONFIG=${CONFIG:-configs/fer2013-cpu.yaml}
EXTRA=${EXTRA:-}
PY=${PY:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null; then
  echo "using python3: $PY is not there (make install builds .venv, or set PY=...)" >&2
  PY=python3
fi

# FER's val folder, found as jobs/prepare.py finds it (any case; valid/, validation/);
# without train and val, a line saying the script is skipped.
VAL=$("$PY" -c 'import sys; from bench.common import split_folders; f = split_folders(sys.argv[1]); print(f[1] if f else "")' "$FER")
case "$VAL" in
  skipped:*) echo "$VAL (set FER=...)"; exit 0 ;;
esac

# A run folder of before would be resumed, or (finished) have its outputs rewritten in
# seconds: its figures, not this run's, with the minutes of neither.
if [ -e "$OUT/run" ]; then
  echo "error: $OUT/run exists, from a run before; remove it (or set OUT=...) to train again" >&2
  exit 1
fi
mkdir -p "$OUT"
if [ -f "$OUT/shards/manifest.json" ]; then
  # Prepared before: reused if from this FER (prepare takes ~2 minutes).
  "$PY" - "$OUT/shards/manifest.json" "$FER" <<'EOF'
import json, os, sys
source = json.load(open(sys.argv[1]))["source"]
if os.path.realpath(source) != os.path.realpath(sys.argv[2]):
    sys.exit(f"error: {os.path.dirname(sys.argv[1])} was prepared from {source}, not {sys.argv[2]}; "
             "remove it (or set OUT=...)")
EOF
else
  "$PY" jobs/prepare.py --source "$FER" --output "$OUT/shards"
fi

start=$(date +%s)
# shellcheck disable=SC2086  # EXTRA is a list of flags
"$PY" jobs/train.py --config "$CONFIG" --data "$OUT/shards" --output "$OUT/run" $EXTRA
seconds=$(( $(date +%s) - start ))

# In fp32 (--amp off), so that the figures in bench/ACCURACY.md compare across CPUs
# (the default, auto, scores in bf16 where a CPU computes it faster). SCORE_FLAGS replaces
# the scoring flags: bench/gpu_check.sh scores on the GPU (a ResNet50 at 224 px with
# ten-crop TTA on CPUs took longer than that script's step allows).
SCORE_FLAGS=${SCORE_FLAGS:---amp off}
# shellcheck disable=SC2086  # SCORE_FLAGS is a list of flags
"$PY" jobs/predict.py --model "$OUT/run/best" --input "$VAL" --output "$OUT/val" $SCORE_FLAGS
# shellcheck disable=SC2086
"$PY" jobs/predict.py --model "$OUT/run/best" --input "$VAL" --output "$OUT/val_tta" --tta $SCORE_FLAGS
# shellcheck disable=SC2086
"$PY" jobs/predict.py --model "$OUT/run/best" --input "$VAL" --output "$OUT/val_tencrop" --tta ten-crop $SCORE_FLAGS

"$PY" - "$OUT" "$seconds" <<'EOF'
import json, sys
out, seconds = sys.argv[1], int(sys.argv[2])
plain = json.load(open(f"{out}/val/summary.json"))
tta = json.load(open(f"{out}/val_tta/summary.json"))
crops = json.load(open(f"{out}/val_tencrop/summary.json"))
print(f"val_acc={plain['accuracy']:.4f} val_macro_f1={plain['macro_f1']:.4f} "
      f"val_acc_tta={tta['accuracy']:.4f} val_macro_f1_tta={tta['macro_f1']:.4f} "
      f"val_acc_tencrop={crops['accuracy']:.4f} val_macro_f1_tencrop={crops['macro_f1']:.4f} "
      f"train_minutes={seconds / 60:.1f}")
EOF
