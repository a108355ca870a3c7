"""Writing results: PNG grids, per-image PNGs and an npz, all-or-nothing.

Everything goes to a temporary folder beside the output folder first and is moved into
place only once complete, so a failure or an interrupt leaves no partial output.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tile rows of H x W x 3 uint8 images (rows may differ in length) on a black background."""
    h, w, c = rows[0].shape[1:]
    cols = max(len(r) for r in rows)
    out = np.zeros((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for r, row in enumerate(rows):
        for k, img in enumerate(row):
            top, left = pad + r * (h + pad), pad + k * (w + pad)
            out[top:top + h, left:left + w] = img
    return out


def class_rows(images: np.ndarray, labels: np.ndarray, classes: list[int]) -> list[np.ndarray]:
    """One row per class, in the order the classes were asked for; a square grid for one class."""
    if len(classes) == 1:
        cols = math.ceil(math.sqrt(len(images)))
        return [images[i:i + cols] for i in range(0, len(images), cols)]
    return [images[labels == c] for c in classes if (labels == c).any()]


def save_png(path: Path, image: np.ndarray, scale: int = 1) -> None:
    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


def existing_ancestor(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def check_writable(out: Path) -> None:
    """Fail before any work if `out` cannot be created (with its parents) or written."""
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out} exists and is not a folder")
    base = existing_ancestor(out)
    if not base.is_dir():
        raise OSError(f"--out {out}: {base} is not a folder")
    if not os.access(base, os.W_OK):
        raise OSError(f"--out {out} is not writable")


@contextmanager
def staged_output(out: Path):
    """Yield a temporary folder; on success move its entries into `out` (replacing old ones).

    The stage lives in the nearest existing ancestor of `out`, so a failure creates nothing.
    """
    out = Path(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=existing_ancestor(out.parent)))
    try:
        yield stage
        out.mkdir(parents=True, exist_ok=True)
        for entry in stage.iterdir():
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_samples(out: Path, images: np.ndarray, labels: np.ndarray, classes: list[int]) -> None:
    """DIR/grid.png, DIR/images/NNNNNN.png and DIR/samples.npz (x: uint8 N x H x W x 3, y: int64)."""
    with staged_output(out) as stage:
        (stage / "images").mkdir()
        for k, img in enumerate(images):
            save_png(stage / "images" / f"{k:06d}.png", img)
        np.savez(stage / "samples.npz", x=images, y=labels.astype(np.int64))
        save_png(stage / "grid.png", grid(class_rows(images, labels, classes)), scale=2)
