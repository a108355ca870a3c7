"""Crafted data sets (archives, pickles, images, .npz) fed to `ddpm-train` and `ddpm-engine fid-ref`
/ `fid`: each is refused in one line, runs no code and writes nothing."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.apps import cli as engine_cli
from engine.evaluation import fid
from tests.fuzz.crafted import npz_claiming
from tests.training.formats import crafted_cifar10, png, write_cifar10
from training import data
from training.cli import main as train_main
from training.data import Archive


def folder_with(root, name: str, content: bytes):
    """A class folder holding one good image and the crafted file `name`."""
    (root / "data" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "data" / "a" / "0.png")
    (root / "data" / "a" / name).write_bytes(content)
    return root / "data"


def float_tiff() -> bytes:
    import io
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4), 0.5, np.float32), "F").save(out, format="TIFF")
    return out.getvalue()


def int32_tiff() -> bytes:
    import io
    out = io.BytesIO()
    Image.fromarray(np.full((4, 4), 70_000, np.int32), "I").save(out, format="TIFF")
    return out.getvalue()


BOMB = png(np.zeros((1, 1), np.uint8), size=(60_000, 60_000))

# (id, make(tmp_path) -> data dir, expected words); every case is a folder data set.
IMAGES = [
    ("bomb", lambda d: folder_with(d, "1.png", BOMB), "1.png: not a readable image (over Pillow's size limit)"),
    ("too-large", lambda d: folder_with(d, "1.png", png(np.zeros((1, 1), np.uint8), size=(9000, 9000))),
     "9000 x 9000 pixels is over the limit"),
    ("junk", lambda d: folder_with(d, "1.png", b"\x89PNG\r\n\x1a\n junk"), "1.png: not a readable image"),
    ("truncated", lambda d: folder_with(d, "1.png", png(np.zeros((64, 64, 3), np.uint8))[:60]), "1.png: not a readable image"),
    ("float", lambda d: folder_with(d, "1.tiff", float_tiff()), "floating-point images"),
    ("32-bit", lambda d: folder_with(d, "1.tiff", int32_tiff()), "beyond 16 bits"),
]


def train_argv(tmp_path, dataset, data_dir):
    return ["--preset", "tiny", "--dataset", dataset, "--data-dir", data_dir, "--steps", 1, "--batch-size", 2,
            "--device", "cpu", "--no-progress", "--out", tmp_path / "run"]


@pytest.mark.parametrize("name, make, message", IMAGES, ids=[c[0] for c in IMAGES])
def test_crafted_images_in_training(refused, tmp_path, name, make, message):
    refused(train_main, train_argv(tmp_path, "folder", make(tmp_path)), tmp_path, message, seconds=5.0)


@pytest.mark.parametrize("extracted", [True, False])
def test_crafted_cifar10_in_training_runs_no_code(refused, tmp_path, monkeypatch, extracted):
    marker = tmp_path / "pwned"
    path = crafted_cifar10(tmp_path / "data", marker, extracted)
    # Refused by its checksum, and, with the checksum made to pass, by the restricted unpickler.
    if not extracted:
        refused(train_main, train_argv(tmp_path, "cifar10", tmp_path / "data"), tmp_path, "is not the official archive's")
        md5 = hashlib.md5(path.read_bytes()).hexdigest()
        monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive("file:///nowhere", "cifar-10-python.tar.gz", md5))
    refused(train_main, train_argv(tmp_path, "cifar10", tmp_path / "data"), tmp_path, "refusing to load")
    assert not marker.exists()


def test_truncated_cifar10_archive_in_training(refused, tmp_path, monkeypatch):
    path = write_cifar10(tmp_path / "data", per_batch=50)[0]
    path.write_bytes(path.read_bytes()[:2000])
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive("file:///nowhere", "cifar-10-python.tar.gz", md5))
    refused(train_main, train_argv(tmp_path, "cifar10", tmp_path / "data"), tmp_path, "cifar-10-python.tar.gz")


HAS_EVAL = importlib.util.find_spec("scipy") is not None and fid.packaged_weights() is not None
needs_eval = pytest.mark.skipif(not HAS_EVAL, reason="needs the eval extra (Inception network, scipy)")


@pytest.fixture
def network_once(monkeypatch):
    """Load the Inception network once for all the fid cases (2 s each otherwise)."""
    monkeypatch.setattr(engine_cli, "load_network", cached_network)


@functools.cache
def cached_network(*args):
    return fid.load_network(*args)


def tarred(tmp_path, folder):
    archive = tmp_path / "images.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="images")
    return archive


FID_SOURCES = [
    ("bomb-in-folder", lambda d: folder_with(d, "1.png", BOMB), "1.png: not a readable image"),
    ("bomb-in-tar", lambda d: tarred(d, folder_with(d, "1.png", BOMB)), "1.png: not a readable image"),
    ("npz-claims-terabytes", lambda d: npz_claiming(d / "x.npz", (10**6, 1000, 1000, 3)), "but holds"),
    ("npz-of-objects", lambda d: npz_claiming(d / "x.npz", (2,), descr="|O", data=b"\0" * 16), "expected x = uint8"),
    ("cifar-pickle-folder", lambda d: crafted_cifar10(d / "c", d / "pwned", True).parent, "refusing to load"),
    ("cifar-pickle-tar", lambda d: crafted_cifar10(d / "c", d / "pwned", False), "refusing to load"),
]


@needs_eval
@pytest.mark.parametrize("name, make, message", FID_SOURCES, ids=[c[0] for c in FID_SOURCES])
def test_crafted_fid_sources(refused, tmp_path, network_once, name, make, message):
    source = make(tmp_path)
    split = ["--split", "train"] if name.startswith("cifar") else []
    (tmp_path / "stats.npz").write_bytes(b"earlier statistics")
    refused(engine_cli.main, ["fid-ref", source, *split, "--out", tmp_path / "stats.npz", "--no-progress"],
            tmp_path, message, seconds=20.0)
    assert not (tmp_path / "pwned").exists()
