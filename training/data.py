"""Training sets, loaded whole into memory as uint8 N x 3 x H x W with int64 labels.

Every dataset is small enough to live on the GPU as uint8 (CIFAR-10: 150 MB; STL-10 at
64x64: 1.3 GB), so the input pipeline is one gather per step. Labels are in
[0, num_classes]; the value num_classes is the null class (STL-10's unlabeled images).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from engine.config import CIFAR10_CLASSES, STL10_CLASSES
from engine.evaluation.datasets import IMAGE_SUFFIXES, DataError, read_cifar_labelled, read_rgb

DATASETS = ("cifar10", "stl10", "folder", "synthetic")


@dataclass(frozen=True)
class Archive:
    url: str
    filename: str
    md5: str


# The checksum published on https://www.cs.toronto.edu/~kriz/cifar.html.
CIFAR10_ARCHIVE = Archive("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                          "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a")
CIFAR10_MEMBERS = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)]
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_SPLITS = ("train", "test", "unlabeled")


@dataclass
class Dataset:
    images: torch.Tensor             # uint8, N x 3 x H x W
    labels: torch.Tensor             # int64, N, in [0, num_classes] (num_classes = null class)
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_dataset(name: str, data_dir: Path | None, image_size: int, seed: int = 0) -> Dataset:
    """Load `name` at image_size x image_size (resized with antialiasing where it differs)."""
    match name:
        case "cifar10":
            dataset = load_cifar10(data_dir or Path("data"))
        case "stl10":
            dataset = load_stl10(data_dir or Path("data"))
        case "folder":
            if data_dir is None:
                raise DataError("--dataset folder needs --data-dir DIR (one sub-folder of images per class)")
            dataset = load_folder(data_dir, image_size)
        case "synthetic":
            dataset = make_synthetic(image_size, seed=seed)
        case _:
            raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    dataset.images = resize(dataset.images, image_size)
    return dataset


def resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 N x 3 x H x W images, in chunks to bound memory."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((len(images), images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


# ---- CIFAR-10 --------------------------------------------------------------------------

def load_cifar10(data_dir: Path) -> Dataset:
    """The 50,000 training images of the official python archive, downloaded when absent.

    Reads `data_dir/cifar-10-batches-py/` if it was extracted, else the archive itself, after
    checking its published md5. Either way the batches (Python pickles) are read only through
    engine.evaluation.datasets' restricted unpickler, which builds plain dicts, lists, bytes and uint8
    arrays and refuses anything else, so a crafted file cannot run code.
    """
    extracted = data_dir / "cifar-10-batches-py"
    if extracted.is_dir():
        batches = [_read_cifar_batch(extracted.parent / member, lambda p: p.read_bytes()) for member in CIFAR10_MEMBERS]
    else:
        archive = data_dir / CIFAR10_ARCHIVE.filename
        if archive.is_file():
            check_md5(archive, CIFAR10_ARCHIVE)
        else:
            download(CIFAR10_ARCHIVE, archive)
        try:
            with tarfile.open(archive, "r:gz") as tar:
                batches = [_read_cifar_batch(member, lambda m: _tar_member(tar, m)) for member in CIFAR10_MEMBERS]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{archive} is not a readable cifar-10-python.tar.gz ({e})") from None
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_CLASSES)


def check_md5(path: Path, archive: Archive) -> None:
    md5 = hashlib.md5()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                md5.update(chunk)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if md5.hexdigest() != archive.md5:
        raise DataError(f"{path}: md5 {md5.hexdigest()} is not the official archive's; delete it to "
                           "download the real one")


def _tar_member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise DataError(f"{tar.name} has no file {name}: not the official cifar-10-python.tar.gz")
    return member.read()


def _read_cifar_batch(where, read) -> tuple[np.ndarray, np.ndarray]:
    """(N x 3 x 32 x 32 uint8 images, N labels) of one batch, through the restricted unpickler."""
    try:
        raw = read(where)
    except FileNotFoundError:
        raise DataError(f"{where} is missing: the CIFAR-10 folder is incomplete") from None
    return read_cifar_labelled(raw, str(where))


def download(archive: Archive, dest: Path) -> None:
    """Fetch archive.url to dest, checking its published md5; nothing is left at dest on failure."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create --data-dir {dest.parent}: {e.strerror}") from None
    tmp = dest.with_name(f".{dest.name}.part")
    print(f"downloading {archive.url} to {dest}", flush=True)
    md5 = hashlib.md5()
    try:
        with urllib.request.urlopen(archive.url, timeout=60) as response, open(tmp, "wb") as f:
            while chunk := response.read(1 << 20):
                md5.update(chunk)
                f.write(chunk)
        if md5.hexdigest() != archive.md5:
            raise DataError(f"checksum mismatch for {archive.url}: md5 {md5.hexdigest()}, expected {archive.md5}")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {archive.url} into {dest.parent}: {getattr(e, 'reason', e)}") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---- STL-10 ----------------------------------------------------------------------------

def load_stl10(data_dir: Path) -> Dataset:
    """train + test (labelled) and unlabeled (null class) images of `data_dir/stl10_binary/`."""
    folder = data_dir / "stl10_binary"
    missing = [f"{split}_{kind}.bin" for split in STL10_SPLITS for kind in ("X", "y")
               if not (split == "unlabeled" and kind == "y") and not (folder / f"{split}_{kind}.bin").is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(missing)}; download and extract {STL10_URL} into {data_dir}")
    images, labels = [], []
    for split in STL10_SPLITS:
        x = _read_stl_images(folder / f"{split}_X.bin")
        if split == "unlabeled":
            y = np.full(len(x), len(STL10_CLASSES), dtype=np.int64)
        else:
            y = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
            if len(y) != len(x) or y.min(initial=0) < 0 or y.max(initial=0) > 9:
                raise DataError(f"{folder}/{split}_y.bin: {len(y)} labels (must be 1..10) for {len(x)} images")
        images.append(x)
        labels.append(torch.from_numpy(y))
    return Dataset(torch.cat(images), torch.cat(labels), STL10_CLASSES)


def _read_stl_images(path: Path) -> torch.Tensor:
    size = path.stat().st_size
    if size == 0 or size % (3 * 96 * 96):
        raise DataError(f"{path}: {size} bytes is not a whole number of 3 x 96 x 96 images")
    # Each channel is stored column-major, hence the transpose of the last two axes.
    raw = np.memmap(path, dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    return torch.from_numpy(np.ascontiguousarray(raw.transpose(0, 1, 3, 2)))


# ---- image folder ----------------------------------------------------------------------

def load_folder(root: Path, image_size: int) -> Dataset:
    """One sub-folder per class; alphabetical folder order is label order."""
    if not root.is_dir():
        raise DataError(f"--data-dir {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for d in class_dirs}
    if not class_dirs or not all(files.values()):
        empty = [name for name, f in files.items() if not f]
        raise DataError(f"{root} must hold one sub-folder of images per class"
                           + (f"; empty: {', '.join(empty)}" if empty else "; it has no sub-folders"))
    images, labels = [], []
    for label, d in enumerate(class_dirs):
        for f in files[d.name]:
            images.append(_read_image(f, image_size))
            labels.append(label)
    return Dataset(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64),
                   tuple(d.name for d in class_dirs))


def _read_image(path: Path, size: int) -> np.ndarray:
    """3 x size x size uint8; engine.evaluation.datasets.read_rgb refuses bombs and scales 16-bit images to 8 bits."""
    img = read_rgb(path, str(path))
    if img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC, reducing_gap=None)
    return np.asarray(img).transpose(2, 0, 1)


# ---- synthetic -------------------------------------------------------------------------

SYNTHETIC_CLASSES = ("disk", "square", "ring", "cross", "h-stripes", "v-stripes", "diagonal", "checker",
                     "triangle", "dots")


def make_synthetic(image_size: int, per_class: int = 100, seed: int = 0) -> Dataset:
    """Ten classes of one coloured shape each, at a random place, size and tint on a noisy background.

    A pure function of the seed; fast enough to redraw at every start.
    """
    rng = np.random.default_rng(seed)
    n, s = per_class * len(SYNTHETIC_CLASSES), image_size
    labels = np.repeat(np.arange(len(SYNTHETIC_CLASSES)), per_class)
    cy, cx = rng.uniform(0.3, 0.7, (2, n, 1, 1)) * s
    radius = rng.uniform(0.15, 0.3, (n, 1, 1)) * s
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)[:, None] + 0.5
    dy, dx = yy - cy, xx - cx
    period = max(s / 8, 2.0)
    shapes = [
        dy**2 + dx**2 < radius**2,
        np.maximum(abs(dy), abs(dx)) < radius,
        abs(np.sqrt(dy**2 + dx**2) - radius) < radius / 3,
        (np.minimum(abs(dy), abs(dx)) < radius / 3) & (np.maximum(abs(dy), abs(dx)) < radius),
        np.broadcast_to((yy // period) % 2 == 0, (n, s, s)),
        np.broadcast_to((xx // period) % 2 == 0, (n, s, s)),
        np.broadcast_to(((xx + yy) // period) % 2 == 0, (n, s, s)),
        np.broadcast_to(((xx // period) + (yy // period)) % 2 == 0, (n, s, s)),
        (dy < radius) & (abs(dx) < (dy + radius) / 2),
        (np.hypot((dy % (radius / 1.5)) - radius / 3, (dx % (radius / 1.5)) - radius / 3) < radius / 5)
        & (np.maximum(abs(dy), abs(dx)) < radius),
    ]
    mask = np.stack([shapes[c][i] for i, c in enumerate(labels)])
    hue = labels / len(SYNTHETIC_CLASSES) + rng.uniform(-0.03, 0.03, n)
    colour = 0.5 + 0.5 * np.cos(2 * np.pi * (hue[:, None] + np.array([0.0, 1 / 3, 2 / 3])))  # n x 3 in [0, 1]
    background = rng.uniform(0.0, 0.25, (n, 3, 1, 1)) + rng.normal(0, 0.04, (n, 3, s, s))
    images = np.where(mask[:, None], colour[:, :, None, None], background)
    images = (images.clip(0, 1) * 255).round().astype(np.uint8)
    return Dataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), SYNTHETIC_CLASSES)
