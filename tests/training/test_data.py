import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import CIFAR10_CLASSES, STL10_CLASSES
from training import data
from training.data import Archive, DatasetError, load_dataset, make_synthetic, resize
from tests.training.formats import write_cifar10, write_stl10


@pytest.mark.parametrize("extracted", [False, True])
def test_cifar10_official_format(tmp_path, extracted):
    _, images, labels = write_cifar10(tmp_path, per_batch=3, extracted=extracted)
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
    with pytest.raises(DatasetError, match="checksum mismatch"):
        load_dataset("cifar10", tmp_path / "data", 32)
    assert list((tmp_path / "data").iterdir()) == []


def test_cifar10_download_failure_is_a_dataset_error(tmp_path, monkeypatch):
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    monkeypatch.setattr(data, "CIFAR10_ARCHIVE", Archive(missing, "cifar-10-python.tar.gz", "0" * 32))
    with pytest.raises(DatasetError, match="could not download"):
        load_dataset("cifar10", tmp_path / "data", 32)


@pytest.mark.parametrize("damage", ["garbage", "missing-member", "bad-pickle"])
def test_cifar10_malformed(tmp_path, damage):
    if damage == "garbage":
        (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    elif damage == "missing-member":
        write_cifar10(tmp_path, drop="data_batch_3")
    else:
        folder = write_cifar10(tmp_path, extracted=True)[0]
        (folder / "data_batch_2").write_bytes(b"\x80\x02}q\x00.")  # a pickled empty dict
    with pytest.raises(DatasetError, match="cifar|CIFAR"):
        load_dataset("cifar10", tmp_path, 32)


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
    with pytest.raises(DatasetError, match="train_X.bin"):
        load_dataset("stl10", tmp_path, 64)
    write_stl10(tmp_path)
    with open(tmp_path / "stl10_binary" / "test_X.bin", "ab") as f:
        f.write(b"\x00" * 7)
    with pytest.raises(DatasetError, match="test_X.bin"):
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
    with pytest.raises(DatasetError, match="needs --data-dir"):
        load_dataset("folder", None, 32)
    with pytest.raises(DatasetError, match="not a folder"):
        load_dataset("folder", tmp_path / "missing", 32)
    with pytest.raises(DatasetError, match="no sub-folders"):
        load_dataset("folder", tmp_path, 32)
    write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: empty"):
        load_dataset("folder", tmp_path, 32)
    (tmp_path / "empty" / "broken.png").write_bytes(b"no png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("folder", tmp_path, 32)


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
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_dataset("mnist", None, 32)
