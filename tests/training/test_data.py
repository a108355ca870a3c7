import hashlib
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import CIFAR10_CLASSES, STL10_CLASSES
from engine.evaluation.datasets import DataError
from tests.training.formats import crafted_cifar10, png, write_cifar10, write_stl10
from training import data
from training.data import Archive, load_dataset, make_synthetic, resize


def trust(monkeypatch, archive):
    """Make `archive` (a test's own) the official cifar-10-python.tar.gz as far as its md5 goes."""
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive("file:///nowhere", "cifar-10-python.tar.gz", md5))


@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_official_format(tmp_path, monkeypatch, extracted):
    path, images, labels = write_cifar10(tmp_path, per_batch=3, extracted=extracted)
    if not extracted:
        trust(monkeypatch, path)
    ds = load_dataset("cifar10", tmp_path, 32)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (15, 3, 32, 32)
    np.testing.assert_array_equal(ds.images.numpy(), images)  # red, green, blue planes, row-major
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert ds.class_names == CIFAR10_CLASSES


def test_cifar10_downloads_and_checks_the_checksum(tmp_path, monkeypatch):
    source, images, _ = write_cifar10(tmp_path / "server")
    md5 = hashlib.md5(source.read_bytes()).hexdigest()
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive(source.as_uri(), "cifar-10-python.tar.gz", md5))
    ds = load_dataset("cifar10", tmp_path / "data", 32)
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").read_bytes() == source.read_bytes()
    np.testing.assert_array_equal(ds.images.numpy(), images)


def test_cifar10_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    source, _, _ = write_cifar10(tmp_path / "server")
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive(source.as_uri(), "cifar-10-python.tar.gz", "0" * 32))
    with pytest.raises(DataError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "data", 32)
    assert list((tmp_path / "data").iterdir()) == []


def test_cifar10_download_failure_is_a_data_error(tmp_path, monkeypatch):
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive(missing, "cifar-10-python.tar.gz", "0" * 32))
    with pytest.raises(DataError, match="could not download"):
        load_dataset("cifar10", tmp_path / "data", 32)


@pytest.mark.parametrize("damage, message", [
    ("garbage", "not a readable cifar-10-python.tar.gz"),
    ("missing-member", "has no file cifar-10-batches-py/data_batch_3"),
    ("bad-pickle", "data_batch_2: not a CIFAR-10 batch"),
    ("label-10", "data_batch_1: malformed CIFAR-10 batch"),
    ("no-labels", "data_batch_1: not a CIFAR-10 batch \\(labels"),
])
def test_cifar10_malformed(tmp_path, monkeypatch, damage, message):
    if damage == "garbage":
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
        trust(monkeypatch, tmp_path / "cifar-10-python.tar.gz")
    elif damage == "missing-member":
        trust(monkeypatch, write_cifar10(tmp_path, drop="data_batch_3")[0])
    else:
        folder = write_cifar10(tmp_path, extracted=True)[0]
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}
        raw = {"bad-pickle": b"\x80\x02}q\x00.",  # a pickled empty dict
               "label-10": pickle.dumps(batch, protocol=2),
               "no-labels": pickle.dumps({b"data": batch[b"data"]}, protocol=2)}[damage]
        (folder / ("data_batch_2" if damage == "bad-pickle" else "data_batch_1")).write_bytes(raw)
    with pytest.raises(DataError, match=message):
        load_dataset("cifar10", tmp_path, 32)


def test_cifar10_archive_that_is_not_the_official_one_is_refused_unread(tmp_path, monkeypatch):
    write_cifar10(tmp_path)  # a well-formed archive, but not the published file
    opened = []
    monkeypatch.setattr(data.tarfile, "open", lambda *a, **k: opened.append(a))
    md5 = hashlib.md5((tmp_path / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    assert data.CIFAR10_ARCHIVE.md5 == "c58f30108f718f92721af3b95e74349a"  # the published checksum
    with pytest.raises(DataError, match=f"cifar-10-python.tar.gz: md5 {md5} is not the official archive's"):
        load_dataset("cifar10", tmp_path, 32)
    assert opened == []


@pytest.mark.parametrize("extracted", [True, False])
def test_crafted_cifar10_pickle_is_refused_and_never_run(tmp_path, monkeypatch, extracted):
    marker = tmp_path / "pwned"
    path = crafted_cifar10(tmp_path / "data", marker, extracted)
    if not extracted:
        trust(monkeypatch, path)  # even an archive whose checksum passes is read safely
    with pytest.raises(DataError, match="data_batch_1: not a CIFAR-10 batch \\(UnpicklingError: refusing to load "
                                        "(posix|os|nt).system") as info:
        load_dataset("cifar10", tmp_path / "data", 32)
    assert "\n" not in str(info.value)
    assert not marker.exists()
    # The file really holds an exploit: the plain unpickler runs it.
    raw = (path / "data_batch_1").read_bytes() if extracted else \
        tarfile.open(path).extractfile("cifar-10-batches-py/data_batch_1").read()
    pickle.loads(raw)
    assert marker.exists()


def test_stl10_official_format(tmp_path):
    images, labels = write_stl10(tmp_path)
    ds = load_dataset("stl10", tmp_path, 96)
    np.testing.assert_array_equal(ds.images.numpy(), images)  # column-major planes transposed back
    np.testing.assert_array_equal(ds.labels.numpy(), labels)
    assert ds.class_names == STL10_CLASSES and (ds.labels == 10).sum() == 4  # unlabeled -> null class


def test_stl10_resized_to_64(tmp_path):
    images, _ = write_stl10(tmp_path)
    ds = load_dataset("stl10", tmp_path, 64)
    assert ds.images.shape == (9, 3, 64, 64) and ds.images.dtype == torch.uint8
    reference = torch.nn.functional.interpolate(torch.from_numpy(images).float(), size=(64, 64), mode="bilinear",
                                                antialias=True)
    assert (ds.images.float() - reference).abs().max() <= 0.5 + 1e-4


def test_stl10_missing_and_malformed(tmp_path):
    with pytest.raises(DataError, match="train_X.bin"):
        load_dataset("stl10", tmp_path, 64)
    write_stl10(tmp_path)
    with open(tmp_path / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(DataError, match="test_X.bin"):
        load_dataset("stl10", tmp_path, 64)


def write_folder(root, classes=("cat", "ant", "bee"), per_class=2, size=40):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_folder_alphabetical_labels_and_resize(tmp_path):
    write_folder(tmp_path, per_class=2)
    (tmp_path / "ant" / "notes.txt").write_text("ignored")
    ds = load_dataset("folder", tmp_path, 32)
    assert ds.class_names == ("ant", "bee", "cat")
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.images.shape == (6, 3, 32, 32)


def test_folder_same_size_is_exact(tmp_path):
    write_folder(tmp_path, classes=("a",), per_class=1, size=32)
    ds = load_dataset("folder", tmp_path, 32)
    expected = np.asarray(Image.open(tmp_path / "a" / "0.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.images[0].numpy(), expected)


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("folder", None, 32)
    with pytest.raises(DataError, match="not a folder"):
        load_dataset("folder", tmp_path / "missing", 32)
    with pytest.raises(DataError, match="no sub-folders"):
        load_dataset("folder", tmp_path, 32)
    write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: empty"):
        load_dataset("folder", tmp_path, 32)
    (tmp_path / "empty" / "broken.png").write_bytes(b"no png")
    with pytest.raises(DataError, match="broken.png"):
        load_dataset("folder", tmp_path, 32)


def test_folder_16_bit_pngs_are_scaled_not_clipped(tmp_path):
    (tmp_path / "a").mkdir()
    grey = np.array([[0, 257, 4000, 32768], [40000, 65000, 65535, 128]] * 2, dtype=np.uint16)
    (tmp_path / "a" / "grey.png").write_bytes(png(grey, bit_depth=16))
    colour = np.random.default_rng(0).integers(0, 65536, (4, 4, 3)).astype(np.uint16)
    (tmp_path / "a" / "rgb.png").write_bytes(png(colour, bit_depth=16))
    ds = load_dataset("folder", tmp_path, 4)  # 4 x 4 images: no resize
    # v * 255 / 65535 rounded, by hand (a clipped read gives 255 for all but 0 and 128).
    np.testing.assert_array_equal(ds.images[0, :, :2].numpy(), [[[0, 1, 16, 128], [156, 253, 255, 0]]] * 3)
    np.testing.assert_array_equal(ds.images[1].numpy(), (colour >> 8).transpose(2, 0, 1))  # 48-bit RGB: the high byte


@pytest.mark.parametrize("size, message", [
    ((9000, 9000), "9000 x 9000 pixels is over the limit"),    # past our limit, under Pillow's warning
    ((100_000, 100_000), "over Pillow's size limit"),           # past Pillow's own error
])
def test_folder_decompression_bomb_is_refused_in_one_line(tmp_path, size, message):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bomb.png").write_bytes(png(np.zeros((1, 1), np.uint8), size=size))
    with pytest.raises(DataError, match=f"bomb.png: .*{message}") as info:
        load_dataset("folder", tmp_path, 32)
    assert "\n" not in str(info.value)


def test_synthetic_is_deterministic_and_class_dependent():
    a, b, c = make_synthetic(32, seed=3), make_synthetic(32, seed=3), make_synthetic(32, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (1000, 3, 32, 32) and a.labels.bincount().tolist() == [100] * 10
    # The classes differ in colour: per-class mean colours are far apart.
    means = torch.stack([a.images[a.labels == k].float().amax(dim=(2, 3)).mean(0) for k in range(10)])
    distances = torch.cdist(means, means) + torch.eye(10) * 1e9
    assert distances.min() > 10


def test_resize_keeps_constant_images():
    x = torch.full((5, 3, 96, 96), 77, dtype=torch.uint8)
    assert torch.equal(resize(x, 64), torch.full((5, 3, 64, 64), 77, dtype=torch.uint8))


def test_unknown_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("mnist", None, 32)
