#!/usr/bin/env bash
# The bundled CIFAR-10 model, trained on a CPU (issue "The bundled CIFAR-10 model, trained on the
# CPU"), in sessions: each call trains for MINUTES more (resuming the run in RUN), then writes the
# fp16 EMA weights that ship in engine/weights/.
#
#   bash training/recipes/bundled-cifar10-cpu.sh           # train MINUTES more, then export
#   bash training/recipes/bundled-cifar10-cpu.sh export    # only write the weights of the run so far
#   bash training/recipes/bundled-cifar10-cpu.sh cooldown  # cool a copy of the run MINUTES more, then export it
#
# From scratch this is the whole recipe: call it until the model is good enough (see
# engine/weights/README.md for how long that took here). On a machine that lost RUN, the run
# continues from the committed weights (--init-from: model and EMA from them, fresh optimizer).
# The learning rate is constant after the warm-up, so a run stopped and continued any number of
# times (or restarted from the weights) follows the same recipe.
#
# A cooldown (warmup-stable-decay, Hägele et al. 2024): as the rate is constant, a copy of RUN can be
# cooled to 0 as a branch while RUN itself goes on, to be cooled again later. The branch is the copy,
# resumed with ddpm-train's cooldown from the step of its last checkpoint, STEP (the "step" in the
# header of its state.safetensors; ddpm-train refuses an earlier one), then its weights exported:
#
#   cp -r runs/bundled-cifar10-cpu runs/bundled-cifar10-cpu-cooldown
#   python -m training.cli --out runs/bundled-cifar10-cpu-cooldown --resume --lr-schedule cooldown \
#       --cooldown-start STEP --cooldown-steps 5000 --device cpu --no-progress --time-limit 120
#   RUN=runs/bundled-cifar10-cpu-cooldown bash training/recipes/bundled-cifar10-cpu.sh export
#
# repeating the second command (its cooldown flags may go) until the branch ends, at step STEP + 5000.
# The `cooldown` mode does all of it: a call copies RUN to BRANCH unless BRANCH holds a run, trains
# BRANCH's cooldown of COOLDOWN_STEPS for MINUTES more and exports its weights to
# BRANCH/cifar10.safetensors (not the shipped file: the branch ships only if it measures better). Copying while RUN trains is safe: its state is written atomically, and the
# branch drops the log rows past that state's step.
#
# Settings (environment): MINUTES (default 120), RUN, DATA (the JPEG CIFAR-10 tarball), FID_EVERY
# (steps between FID evaluations, 0 for none), THREADS (torch threads; default 2, the machine's
# cores: use 1 while other work shares the machine, where 2 threads waste time waiting on each other),
# PRECISION (ddpm-train --precision; default auto: bf16 autocast where the CPU has bf16 instructions),
# EMA (which EMA the export ships: "short", the recipe's 0.9995, the default; "long", the second EMA
# of 0.9999 that the run keeps too, in model-ema-long.safetensors; added after 2026-12-01, it started
# from the first EMA where it joined the run). The EMAs' decay warm-up (ddpm-train --ema-warmup) is on
# for a run from scratch and off for one continued from the weights (--init-from); the run of the
# shipped model was continued from them on 2026-11-30 before that rule existed, and was switched to
# --no-ema-warmup on 2026-12-02 at its step 13,000 (before, both EMAs ran at ~0.9993, the same).
# BRANCH (the cooldown's run folder; default RUN-cooldown) and COOLDOWN_STEPS (the decay's length,
# default 5000, read when the branch is made) are the cooldown mode's.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PRESET=cifar10-cpu
MINUTES="${MINUTES:-120}"
RUN="${RUN:-runs/bundled-cifar10-cpu}"
BRANCH="${BRANCH:-$RUN-cooldown}"
DATA="${DATA:-../shared/data/cifar10-jpeg.tar.gz}"
FID_EVERY="${FID_EVERY:-10000}"
export OMP_NUM_THREADS="${THREADS:-2}"
WEIGHTS=engine/weights/cifar10.safetensors
case "${EMA:-short}" in
    short) EXPORTED=model.safetensors ;;
    long) EXPORTED=model-ema-long.safetensors ;;
    *) echo "EMA must be short or long" >&2; exit 2 ;;
esac
FID_REF=runs/fid/cifar10-jpeg-test.npz

export_weights() {  # of the run in $1, to $2 (default: the shipped weights)
    python - "$1/$EXPORTED" "${2:-$WEIGHTS}" <<'PY'
import sys

import torch

from engine.formats.checkpoint import load_checkpoint, save_checkpoint

ckpt = load_checkpoint(sys.argv[1])
save_checkpoint(sys.argv[2], ckpt.model, ckpt.diffusion, ckpt.class_names, dtype=torch.float16)
PY
    ls -l "${2:-$WEIGHTS}"
}

mode="${1:-train}"
case "$mode" in
    export) export_weights "$RUN"; exit 0 ;;
    train | cooldown) ;;
    *) echo "usage: $0 [export | cooldown]" >&2; exit 2 ;;
esac

# The data (50,000 JPEG training images) and the 10,000 test images' statistics for the FID in log.csv
# (2,000 samples, DDIM --sample-steps (20), w = 1.8).
if [ ! -d runs/data/cifar10-jpeg/train ]; then
    mkdir -p runs/data && tar -xzf "$DATA" -C runs/data
fi
fid=(--fid-every 0)  # none, also in a resumed run that had them
if [ "$FID_EVERY" != 0 ]; then
    [ -f "$FID_REF" ] || python -m engine.apps.cli fid-ref runs/data/cifar10-jpeg/test --out "$FID_REF" --no-progress
    fid=(--fid-every "$FID_EVERY" --fid-samples 2000 --fid-ref "$FID_REF")
fi

if [ "$mode" = cooldown ]; then
    if [ ! -f "$BRANCH/state.safetensors" ]; then
        [ -f "$RUN/state.safetensors" ] || { echo "no run in $RUN to cool" >&2; exit 2; }
        [ ! -e "$BRANCH" ] || { echo "$BRANCH is there but holds no run" >&2; exit 2; }
        cp -r "$RUN" "$BRANCH"
    fi
    # A copy not yet cooling starts its cooldown at its step; a branch cooling already keeps its own.
    step=$(python - "$BRANCH/state.safetensors" <<'PY'
import sys

from training.state import read_metadata, read_train_config

if read_train_config(sys.argv[1]).get("lr_schedule") != "cooldown":
    print(read_metadata(sys.argv[1])["step"])
PY
)
    cooldown=()
    if [ -n "$step" ]; then
        cooldown=(--lr-schedule cooldown --cooldown-start "$step" --cooldown-steps "${COOLDOWN_STEPS:-5000}")
    fi
    python -m training.cli "${cooldown[@]}" "${fid[@]}" --resume --time-limit "$MINUTES" --device cpu --no-progress \
        --out "$BRANCH"
    export_weights "$BRANCH" "$BRANCH/cifar10.safetensors"  # measured against RUN's before it ships
    exit 0
fi

recipe=(--preset "$PRESET" --dataset folder --data-dir runs/data/cifar10-jpeg/train --batch-size 32
        --lr 1e-3 --warmup-multiplier 1 --warmup-epochs 0.5 --lr-schedule constant --ema-decay 0.9995
        --ema-long-decay 0.9999
        --min-snr-gamma 5
        --p-uncond 0.1 --steps 10000000 --device cpu --precision "${PRECISION:-auto}")
start=()
if [ ! -f "$RUN/state.safetensors" ] && [ -f "$WEIGHTS" ]; then
    start=(--init-from "$WEIGHTS")   # a new machine: continue from the committed weights
fi
python -m training.cli "${recipe[@]}" "${start[@]}" "${fid[@]}" --resume --time-limit "$MINUTES" \
    --checkpoint-every 500 --sample-every 5000 --log-every 100 --no-progress --out "$RUN"
export_weights "$RUN"
