"""Writers of small datasets in the official on-disk formats, for the loader tests."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np


def cifar_batch(rng: np.random.Generator, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A pickled CIFAR-10 batch (dict with b"data", b"labels") and its images (N x 3 x 32 x 32)."""
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    batch = {b"batch_label": b"test", b"labels": labels.tolist(), b"data": images.reshape(n, 3072),
             b"filenames": [b"x.png"] * n}
    return pickle.dumps(batch, protocol=2), images, labels


def write_cifar10(root: Path, per_batch: int = 4, seed: int = 0, extracted: bool = False,
                  drop: str | None = None) -> tuple[Path, np.ndarray, np.ndarray]:
    """cifar-10-python.tar.gz (or its extracted folder) with data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    members, images, labels = {}, [], []
    for i in range(1, 6):
        raw, x, y = cifar_batch(rng, per_batch)
        members[f"data_batch_{i}"] = raw
        images.append(x)
        labels.append(y)
    members["test_batch"] = cifar_batch(rng, per_batch)[0]
    members["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10, b"num_vis": 3072}, protocol=2)
    members.pop(drop, None)
    root.mkdir(parents=True, exist_ok=True)
    if extracted:
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        for name, raw in members.items():
            (folder / name).write_bytes(raw)
        path = folder
    else:
        path = root / "cifar-10-python.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            for name, raw in members.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return path, np.concatenate(images), np.concatenate(labels)


def write_stl10(root: Path, n_train: int = 3, n_test: int = 2, n_unlabeled: int = 4,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """stl10_binary/{train,test,unlabeled}_X.bin (each channel column-major) and *_y.bin (1..10).

    Returns the images as N x 3 x 96 x 96 (row-major, i.e. as they look) and the labels
    0..9 (10 for unlabeled), in the order train, test, unlabeled.
    """
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images, labels = [], []
    for split, n in (("train", n_train), ("test", n_test), ("unlabeled", n_unlabeled)):
        x = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        x.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        images.append(x)
        if split == "unlabeled":
            labels.append(np.full(n, 10))
        else:
            y = rng.integers(1, 11, n).astype(np.uint8)
            y.tofile(folder / f"{split}_y.bin")
            labels.append(y.astype(np.int64) - 1)
    return np.concatenate(images), np.concatenate(labels)


def png(pixels: np.ndarray, bit_depth: int = 8, size: tuple[int, int] | None = None) -> bytes:
    """A PNG written by hand: grey (H x W) or RGB (H x W x 3) pixels at 8 or 16 bits. `size`
    (width, height) overrides the header's dimensions: with a bigger size the header claims
    pixels the file does not hold (a decompression bomb is all header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    height, width = pixels.shape[:2]
    width, height = size or (width, height)
    colour = 2 if pixels.ndim == 3 else 0
    rows = pixels.astype(">u2" if bit_depth == 16 else np.uint8).reshape(len(pixels), -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


class Exploit:
    """Unpickling it runs `touch marker` (harmless, and visible)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def crafted_cifar10(root: Path, marker: Path, extracted: bool) -> Path:
    """A CIFAR-10 folder or archive (all members present) whose data_batch_1 runs code when plainly unpickled."""
    folder = write_cifar10(root, extracted=True)[0]
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(marker), b"labels": [0]}, protocol=2))
    if extracted:
        return folder
    path = root / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    for member in folder.iterdir():
        member.unlink()
    folder.rmdir()
    return path
