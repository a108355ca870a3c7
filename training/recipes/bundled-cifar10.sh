#!/usr/bin/env bash
# Trains the bundled model (issue "The bundled CIFAR-10 model") on ONE GPU within a fixed
# training-time budget, and writes the fp16 EMA checkpoint that ships in engine/weights/.
#
#   1. extracts the JPEG CIFAR-10 (../shared/data/cifar10-jpeg.tar.gz, carried in .carry/),
#   2. measures this GPU's training images/s with a short run of the same settings,
#   3. trains for as many steps as fit in BUDGET_S at that rate (a step count, not a timer,
#      so the cosine schedule ends at the end and the run stays exactly resumable; loading the
#      50,000 JPEGs, compiling and the final sample grid come on top of BUDGET_S),
#   4. writes the EMA weights as fp16 to engine/weights/cifar10.safetensors, and copies
#      it with log.csv, the settings and the last sample grid to $OUT when set.
#
# Every setting is an environment variable; the defaults are a starting point, NOT yet tuned
# on the H200 (no session has had one): BATCH, LR, WARMUP_EPOCHS, EMA, BUDGET_S.
# Usage on the GPU machine:  bash training/recipes/bundled-cifar10.sh
# Dry run on a CPU:          DEVICE=cpu PRESET=tiny COMPILE= BUDGET_S=20 PROBE_STEPS=30 WEIGHTS=/tmp/w.safetensors bash training/recipes/bundled-cifar10.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DATA="${DATA:-.carry/cifar10-jpeg.tar.gz}"
PRESET="${PRESET:-cifar10-compact}"
DEVICE="${DEVICE:-cuda}"
BATCH="${BATCH:-256}"
LR="${LR:-2e-4}"
WARMUP_EPOCHS="${WARMUP_EPOCHS:-2}"
EMA="${EMA:-0.9995}"
BUDGET_S="${BUDGET_S:-540}"      # the issue's 9 minutes of training
PROBE_STEPS="${PROBE_STEPS:-150}"
COMPILE="${COMPILE:---compile}"
RUN="${RUN:-runs/bundled-cifar10}"
WEIGHTS="${WEIGHTS:-engine/weights/cifar10.safetensors}"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$DATA" -C "$work"
train=(--preset "$PRESET" --dataset folder --data-dir "$work/cifar10-jpeg/train" --batch-size "$BATCH"
       --lr "$LR" --warmup-multiplier 1 --warmup-epochs "$WARMUP_EPOCHS" --lr-schedule cosine
       --ema-decay "$EMA" --p-uncond 0.1 --device "$DEVICE" --no-progress $COMPILE)

# 2. Throughput probe: the median images/s of the log rows after the first (compilation).
python -m training.cli "${train[@]}" --steps "$PROBE_STEPS" --log-every 10 --sample-every 0 --out "$work/probe"
rate=$(python -c "import csv,statistics,sys; r=[float(x['images_per_s']) for x in csv.DictReader(open(sys.argv[1]))][1:]; print(statistics.median(r) if r else 0)" "$work/probe/log.csv")
steps=$(python -c "import sys; print(max(1, int(float(sys.argv[1]) * float(sys.argv[2]) / int(sys.argv[3]))))" "$rate" "$BUDGET_S" "$BATCH")
echo "probe: $rate images/s -> $steps steps of $BATCH in ${BUDGET_S}s"

# 3. The run itself.
rm -rf "$RUN"
start=$(date +%s)
python -m training.cli "${train[@]}" --steps "$steps" --log-every 50 --sample-every "$steps" --checkpoint-every 2000 --out "$RUN"
echo "training took $(( $(date +%s) - start )) s"
printf 'preset=%s batch=%s lr=%s warmup_epochs=%s ema=%s steps=%s probe_images_per_s=%s budget_s=%s\n' \
    "$PRESET" "$BATCH" "$LR" "$WARMUP_EPOCHS" "$EMA" "$steps" "$rate" "$BUDGET_S" > "$RUN/settings.txt"

# 4. fp16 EMA weights for the package.
mkdir -p engine/weights
python - "$RUN/model.safetensors" "$WEIGHTS" <<'PY'
import sys

import torch

from engine.formats.checkpoint import load_checkpoint, save_checkpoint

ckpt = load_checkpoint(sys.argv[1])
save_checkpoint(sys.argv[2], ckpt.model, ckpt.diffusion, ckpt.class_names, dtype=torch.float16)
PY
ls -l "$WEIGHTS"
if [ -n "${OUT:-}" ]; then
    cp "$WEIGHTS" "$RUN/log.csv" "$RUN/settings.txt" "$OUT"/
    cp "$(ls "$RUN"/samples/*.png | tail -n 1)" "$OUT"/last-samples.png
fi
