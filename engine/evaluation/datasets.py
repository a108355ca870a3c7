"""Image sources for evaluation, streamed as uint8 N x H x W x 3 batches.

One reader, `open_images(path, split, limit)`, for everything `ddpm-engine fid` and `fid-ref`
accept: a `samples.npz` (key `x`), a folder of images (recursive, sorted), a `.tar`/`.tar.gz` of
images read member by member without extracting, and the official CIFAR-10 python batches
(`cifar-10-python.tar.gz` or its extracted `cifar-10-batches-py/`). Nothing is loaded whole
except a `samples.npz` and one CIFAR-10 batch (30 MB) at a time.

Splits: an image belongs to split S when a folder on its path is named S (the image-folder
layout `cifar10-jpeg/{train,test}/<class>/NNNN.jpg`); for the CIFAR-10 batches, train is
data_batch_1..5 and test is test_batch. Without a split, a data set that has a test split
gives its test split, anything else all its images.
"""

from __future__ import annotations

import codecs
import io
import math
import pickle
import struct
import tarfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLITS = ("train", "test")
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MAX_PIXELS = 8192 * 8192  # pixels of one image (192 MB as RGB); Pillow warns only past 89M
MAX_NPZ_BYTES = 2**34  # a samples.npz is loaded whole: 16 GiB is over a million 64 x 64 images


class DataError(UserError):
    """Image data that is missing, malformed or not one of the accepted kinds."""


@dataclass
class ImageSource:
    """`count` images of `path`, described by `name`. batches(batch_size) streams them as uint8
    N x H x W x 3 arrays of at most batch_size images (a new batch where the image size changes)."""
    path: Path
    name: str
    count: int
    batches: Callable[[int], Iterator[np.ndarray]]


def open_images(path: Path, split: str | None = None, limit: int | None = None) -> ImageSource:
    """The images of `path`, of one split (None: 'test' for a data set that has one, else all).

    limit: use only `limit` images, evenly spaced over the sorted list, so that a data set stored
    class by class keeps its class balance.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use {' or '.join(SPLITS)}")
    if path.is_dir():
        if (path / CIFAR10_FOLDER).is_dir():
            path = path / CIFAR10_FOLDER
        if path.name == CIFAR10_FOLDER:
            return _cifar_folder(path, split or "test", limit)
        return _image_folder(path, split, limit)
    if not path.is_file():
        raise DataError(f"{path} not found")
    if path.suffix == ".npz":
        return _npz(path, split, limit)
    if tarfile.is_tarfile(path):
        return _tar(path, split, limit)
    raise DataError(f"{path} is not a samples.npz, a folder of images, a .tar(.gz) of images or a CIFAR-10 archive")


def spread(count: int, limit: int | None) -> np.ndarray:
    """Indices of `limit` items evenly spaced over range(count) (all of them when limit is None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.arange(limit) * count // limit


def describe(path: Path, split: str | None, chosen: int, total: int) -> str:
    """e.g. 'cifar10-jpeg.tar.gz [test]', 'cifar10-jpeg.tar.gz [train, 10000 of 50000 evenly spaced]'."""
    notes = ([split] if split else []) + ([f"{chosen} of {total} evenly spaced"] if chosen != total else [])
    return path.name + (f" [{', '.join(notes)}]" if notes else "")


# Anything Pillow's decoders raise on a malformed file (some plugins raise SyntaxError or struct.error).
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError,
                 TypeError, ZeroDivisionError, Image.DecompressionBombError, Image.DecompressionBombWarning)


def read_rgb(source: BinaryIO | Path, name: str) -> Image.Image:
    """An image file as 8-bit RGB, or one DataError line.

    The size is read from the header and checked against MAX_PIXELS before any pixel is
    decoded (a decompression bomb costs nothing). 16-bit images are scaled to 8 bits
    (v * 255 / 65535, rounded), never clipped at 255; floating-point images are refused.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise DataError(f"{name}: {img.width} x {img.height} pixels is over the limit of "
                                    f"{MAX_PIXELS} (a decompression bomb, or far larger than a model image)")
                return _to_rgb8(img, name)
    except DECODE_ERRORS as e:
        reason = "over Pillow's size limit" if isinstance(e, (Image.DecompressionBombError,
                                                               Image.DecompressionBombWarning)) else str(e)[:100]
        raise DataError(f"{name}: not a readable image ({reason or type(e).__name__})") from None


def _to_rgb8(img: Image.Image, name: str) -> Image.Image:
    if img.mode.startswith("I"):  # I;16*: 16-bit grey; I: 32-bit integers (16-bit PNGs in older Pillow)
        values = np.asarray(img).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise DataError(f"{name}: pixel values beyond 16 bits (mode {img.mode}) are not supported")
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        raise DataError(f"{name}: floating-point images (mode F) are not supported; save 8- or 16-bit images")
    return img.convert("RGB")


def stack(images: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Group H x W x 3 images into batches; images of different sizes go to different batches."""
    batch: list[np.ndarray] = []
    for img in images:
        if batch and (len(batch) == batch_size or img.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(img)
    if batch:
        yield np.stack(batch)


def in_split(parts: tuple[str, ...], split: str | None) -> bool:
    return split is None or split in parts[:-1]


def _selected(names: list[str], path: Path, split: str | None) -> tuple[list[str], str | None]:
    """The names in `split` (None: 'test' when some image is in a test folder, else all) and that split."""
    if not names:
        raise DataError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if split is None and any(in_split(PurePosixPath(n).parts, "test") for n in names):
        split = "test"
    chosen = [n for n in names if in_split(PurePosixPath(n).parts, split)]
    if not chosen:
        raise DataError(f"{path} has no images in a folder named {split!r}")
    return chosen, split


# ---- samples.npz -----------------------------------------------------------------------

def _npz(path: Path, split: str | None, limit: int | None) -> ImageSource:
    if split is not None:
        raise DataError(f"{path}: --split applies to data sets with train/test folders, not to a samples.npz")
    header = npz_header(path, "x")
    if header is None or header[1] != np.uint8 or len(header[0]) != 4 or header[0][-1] != 3 or header[0][0] == 0:
        got = "no key 'x'" if header is None else f"x: {header[1]} {header[0]}"
        raise DataError(f"{path}: expected x = uint8 N x H x W x 3 images as `ddpm-engine sample` writes ({got})")
    try:
        with np.load(path, allow_pickle=False) as data:
            x = data["x"]
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz ({str(e)[:100]})") from None
    total = len(x)
    x = x[spread(total, limit)]

    def read(batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(x), batch_size):
            yield x[start:start + batch_size]

    return ImageSource(path, describe(path, None, len(x), total), len(x), read)


def npz_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of array `key` of a .npz, from its .npy header alone (None if absent), refused
    unless the data the header claims is what the archive holds: numpy allocates the whole array
    before reading it, so a crafted header could ask for terabytes."""
    try:
        with zipfile.ZipFile(path) as archive:
            if f"{key}.npy" not in archive.namelist():
                return None
            info = archive.getinfo(f"{key}.npy")
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(f)
                header_size = f.tell()
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise DataError(f"{path} is not a readable .npz ({str(e)[:100]})") from None
    if math.prod(shape) * dtype.itemsize != info.file_size - header_size or info.file_size > MAX_NPZ_BYTES:
        raise DataError(f"{path}: its {key} claims {shape} {dtype} but holds {info.file_size} bytes")
    return shape, dtype


# ---- folders and tar archives of images --------------------------------------------------

def _image_folder(path: Path, split: str | None, limit: int | None) -> ImageSource:
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    in_split_files, split = _selected(files, path, split)
    chosen = [in_split_files[i] for i in spread(len(in_split_files), limit)]

    def read(batch_size: int) -> Iterator[np.ndarray]:
        return stack((np.asarray(read_rgb(path / name, str(path / name))) for name in chosen), batch_size)

    return ImageSource(path, describe(path, split, len(chosen), len(in_split_files)), len(chosen), read)


def _tar(path: Path, split: str | None, limit: int | None) -> ImageSource:
    try:
        with tarfile.open(path) as tar:
            names = [m.name for m in tar if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable tar archive ({e})") from None
    batches = {PurePosixPath(n).name: n for n in names if PurePosixPath(n).parent.name == CIFAR10_FOLDER}
    if "data_batch_1" in batches or "test_batch" in batches:
        return _cifar_tar(path, batches, split or "test", limit)
    images = sorted(n for n in names if PurePosixPath(n).suffix.lower() in IMAGE_SUFFIXES)
    in_split_images, split = _selected(images, path, split)
    chosen = set(in_split_images[i] for i in spread(len(in_split_images), limit))

    def read(batch_size: int) -> Iterator[np.ndarray]:
        # Archive order (a gzip stream cannot seek back cheaply); the statistics don't depend on order.
        def members() -> Iterator[np.ndarray]:
            try:
                with tarfile.open(path) as tar:
                    for member in tar:
                        if member.name in chosen:
                            # Pillow reads the member lazily: a bomb is refused from its header alone.
                            yield np.asarray(read_rgb(tar.extractfile(member), f"{path}:{member.name}"))
            except (tarfile.TarError, OSError, EOFError) as e:
                raise DataError(f"{path}: archive became unreadable ({e})") from None
        return stack(members(), batch_size)

    return ImageSource(path, describe(path, split, len(chosen), len(in_split_images)), len(chosen), read)


# ---- the official CIFAR-10 python batches -------------------------------------------------

class CifarUnpickler(pickle.Unpickler):
    """Reads a CIFAR-10 batch (a dict of bytes, lists, ints and one uint8 array) and nothing else:
    any global other than the names an ndarray pickle needs is refused, so a crafted file cannot
    call os.system or anything else. (`_codecs.encode` is how Python 3 writes bytes at protocol 2,
    e.g. in a re-pickled copy; it only encodes a string.)"""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): lambda: _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): lambda: _reconstruct,
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds no such object")
        return self.ALLOWED[module, name]()


def _reconstruct(subtype, shape, dtype):
    """numpy's pickle constructor for an ndarray, limited to what numpy itself writes: an empty
    plain ndarray that __setstate__ then fills from the pickle's own bytes (so nothing is
    allocated beyond the file's size)."""
    if subtype is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("refusing to build an ndarray other than numpy's empty placeholder")
    return np.ndarray.__new__(subtype, shape, dtype)


def _unpickle_cifar(raw: bytes, where: str) -> tuple[dict, np.ndarray]:
    """The batch dict of one pickled CIFAR-10 batch, through CifarUnpickler, and its N x 3072 uint8 data."""
    try:
        batch = CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError, AttributeError, IndexError,
            MemoryError, RecursionError) as e:
        raise DataError(f"{where}: not a CIFAR-10 batch ({type(e).__name__}: {str(e)[:100]})") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: malformed CIFAR-10 batch (data {data.shape}, expected N x 3072)")
    return batch, data


def read_cifar_batch(raw: bytes, where: str) -> np.ndarray:
    """The N x 32 x 32 x 3 uint8 images of one pickled CIFAR-10 batch."""
    _, data = _unpickle_cifar(raw, where)
    # Each row is the red, green, then blue 32x32 plane, row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def read_cifar_labelled(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(N x 3 x 32 x 32 uint8 images, N int64 labels in 0..9) of one pickled CIFAR-10 batch."""
    batch, data = _unpickle_cifar(raw, where)
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{where}: not a CIFAR-10 batch (labels: {type(e).__name__})") from None
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise DataError(f"{where}: malformed CIFAR-10 batch ({len(data)} images, labels {labels.shape} "
                        "must be one of 0..9 each)")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar(path: Path, split: str, limit: int | None,
           read_members: Callable[[list[str]], Iterator[tuple[str, bytes]]]) -> ImageSource:
    """read_members(names) yields (name, pickled bytes) for each of the named batches, in any order."""
    members = CIFAR10_BATCHES[split]
    total = 10_000 * len(members)  # the official batch size, checked as each batch is read
    chosen = spread(total, limit)

    def read(batch_size: int) -> Iterator[np.ndarray]:
        for member, raw in read_members(members):
            images = read_cifar_batch(raw, f"{path}:{member}")
            if len(images) != 10_000:
                raise DataError(f"{path}:{member} has {len(images)} images, not the official 10000")
            first = 10_000 * members.index(member)
            local = chosen[(chosen >= first) & (chosen < first + 10_000)] - first
            yield from stack(iter(images[local]), batch_size)

    return ImageSource(path, describe(path, split, len(chosen), total), len(chosen), read)


def _cifar_folder(path: Path, split: str, limit: int | None) -> ImageSource:
    missing = [m for m in CIFAR10_BATCHES[split] if not (path / m).is_file()]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: the CIFAR-10 folder is incomplete")
    return _cifar(path, split, limit, lambda members: ((m, (path / m).read_bytes()) for m in members))


def _cifar_tar(path: Path, batches: dict[str, str], split: str, limit: int | None) -> ImageSource:
    missing = [m for m in CIFAR10_BATCHES[split] if m not in batches]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}: not the official cifar-10-python.tar.gz")

    def read_members(members: list[str]) -> Iterator[tuple[str, bytes]]:
        wanted = {batches[m]: m for m in members}
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name in wanted:
                        yield wanted[member.name], tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise DataError(f"{path}: archive became unreadable ({e})") from None

    return _cifar(path, split, limit, read_members)
