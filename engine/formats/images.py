"""Writing results: PNG grids, per-image PNGs and an npz, all-or-nothing.

Everything goes to a folder beside the output folder first and is moved into place only once
complete, so a failure leaves no partial output (`staged_output`); a long sampling run keeps
its finished shards there, to continue after an interrupt (`SampleRun`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zipfile
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


def class_rows(images: np.ndarray, labels: np.ndarray, classes: list[int], per_class: int | None = None
               ) -> list[np.ndarray]:
    """One row per class (its first `per_class` images), in the order the classes were asked for;
    a square grid for one class (of up to per_class**2 images)."""
    if len(classes) == 1:
        images = images if per_class is None else images[:per_class**2]
        cols = math.ceil(math.sqrt(len(images)))
        return [images[i:i + cols] for i in range(0, len(images), cols)]
    return [images[labels == c][:per_class] for c in classes if (labels == c).any()]


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


GRID_PER_CLASS = 10  # the grid shows the first images of each class: its size does not grow with n


class SampleRun:
    """The output of a sampling run of n images, written as its shards finish.

    Images are sampled in shards of `shard_size` consecutive indices. Each finished shard is
    written at once, into the run's work folder OUT.partial/ beside OUT: its PNGs in images/
    and its arrays in shards/START.npz (atomically, so a shard file is always whole). The
    work folder survives an interrupt or a kill, and the same command finds it and samples
    only the shards still missing; `run.json` there records what the images depend on (the
    model file's hash, the sampler settings, seed, n, classes), and a run with other settings
    is refused rather than mixed in. `finish` streams the shards into samples.npz (memory flat
    in n), draws the grid from the first images of each class, and moves everything into OUT.
    Under torchrun every process writes its own shards into the same folder (one machine).
    """

    def __init__(self, out: Path, n: int, classes: list[int], shard_size: int, settings: dict):
        self.out, self.n, self.classes = Path(out), n, classes
        self.work = self.out.with_name(self.out.name + ".partial")
        self.settings = {"n": n, "classes": classes, "shard_size": shard_size, **settings}
        self.shard_size = shard_size
        self.created: Path | None = None

    def open(self) -> int:
        """Create the work folder, or check it belongs to this run; returns the images already done."""
        record = self.work / "run.json"
        if self.work.exists():
            try:
                saved = json.loads(record.read_text())
            except (OSError, ValueError):
                saved = None
            if saved != json.loads(json.dumps(self.settings)):
                raise OSError(f"{self.work} holds an unfinished run with other settings: delete it, or run that "
                              f"command again to finish it")
        else:
            base = existing_ancestor(self.work.parent)
            # What discard() removes: the work folder, or the first missing folder above it.
            self.created = base / self.work.resolve().relative_to(base).parts[0]
            (self.work / "images").mkdir(parents=True)
            (self.work / "shards").mkdir()
            record.write_text(json.dumps(self.settings, indent=1) + "\n")
        return sum(stop - start for start, stop in self.shards() if self.done(start))

    def shards(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.shard_size, self.n)) for s in range(0, self.n, self.shard_size)]

    def shard_path(self, start: int) -> Path:
        return self.work / "shards" / f"{start:09d}.npz"

    def done(self, start: int) -> bool:
        return self.shard_path(start).is_file()

    def write(self, start: int, images: np.ndarray, labels: np.ndarray) -> None:
        for k, img in enumerate(images):
            save_png(self.work / "images" / f"{start + k:06d}.png", img)
        path = self.shard_path(start)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, x=images, y=labels.astype(np.int64))
        os.replace(tmp, path)

    def finish(self) -> None:
        """samples.npz (x: uint8 N x H x W x 3, y: int64 N) from the shards, grid.png, then the work
        folder's images/, samples.npz and grid.png replace OUT's."""
        shards = self.shards()
        missing = [start for start, _ in shards if not self.done(start)]
        if missing:
            raise OSError(f"{self.work}: shard {missing[0]} is missing")
        first = np.load(self.shard_path(0))
        image_shape = first["x"].shape[1:]
        with zipfile.ZipFile(self.work / "samples.npz", "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for key, dtype, shape in (("x", np.uint8, (self.n, *image_shape)), ("y", np.int64, (self.n,))):
                with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                              "shape": shape}
                    np.lib.format.write_array_header_2_0(member, header)
                    for start, _ in shards:
                        with np.load(self.shard_path(start)) as shard:
                            member.write(np.ascontiguousarray(shard[key], dtype=dtype).tobytes())
        head_x, head_y = [], []
        for start, _ in shards:  # the first GRID_PER_CLASS images of every class (labels cycle the classes)
            if sum(len(y) for y in head_y) >= GRID_PER_CLASS * len(self.classes):
                break
            with np.load(self.shard_path(start)) as shard:
                head_x.append(shard["x"])
                head_y.append(shard["y"])
        save_png(self.work / "grid.png", grid(class_rows(np.concatenate(head_x), np.concatenate(head_y),
                                                         self.classes, GRID_PER_CLASS)), scale=2)
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("images", "samples.npz", "grid.png"):
            target = self.out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(self.work / name, target)
        shutil.rmtree(self.work)

    def discard(self) -> None:
        """After an error: remove the work folder (and the folders made for it) if this call created
        it; an interrupted run's stays."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
