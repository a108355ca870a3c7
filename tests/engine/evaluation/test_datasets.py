import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from engine.evaluation.datasets import CIFAR10_FOLDER, DataError, open_images, read_cifar_batch, spread
from tests.training.formats import png


def images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def read_all(source, batch_size=3):
    batches = list(source.batches(batch_size))
    assert all(b.dtype == np.uint8 and b.ndim == 4 and b.shape[-1] == 3 and len(b) <= batch_size for b in batches)
    return np.concatenate(batches)


def write_pngs(root, layout):
    """layout: relative path -> image; PNG keeps the pixels exactly."""
    for name, img in layout.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / name)


@pytest.fixture
def split_folder(tmp_path):
    """root/{train,test}/<class>/NNNN.png, as cifar10-jpeg; returns (root, {split: images in sorted order})."""
    data = {"train": images(6, 1), "test": images(4, 2)}
    layout = {}
    for split, imgs in data.items():
        for k, img in enumerate(imgs):
            layout[f"{split}/{'ab'[k % 2]}/{k:04d}.png"] = img
    write_pngs(tmp_path / "root", layout)
    order = {split: [layout[n] for n in sorted(layout) if n.startswith(split)] for split in data}
    return tmp_path / "root", {split: np.stack(imgs) for split, imgs in order.items()}


def test_npz_in_order_and_limit(tmp_path):
    x = images(10)
    np.savez(tmp_path / "samples.npz", x=x, y=np.zeros(10, np.int64))
    source = open_images(tmp_path / "samples.npz")
    assert source.count == 10 and np.array_equal(read_all(source), x)
    limited = open_images(tmp_path / "samples.npz", limit=4)
    assert np.array_equal(read_all(limited), x[[0, 2, 5, 7]]) and "4 of 10" in limited.name


def test_spread_is_even_and_complete():
    assert spread(10, None).tolist() == list(range(10))
    assert spread(50_000, 10_000).tolist() == list(range(0, 50_000, 5))
    assert spread(3, 7).tolist() == [0, 1, 2]


def test_folder_defaults_to_test_split_and_picks_train(split_folder):
    root, expected = split_folder
    default = open_images(root)
    assert default.count == 4 and "[test]" in default.name
    assert np.array_equal(read_all(default), expected["test"])
    train = open_images(root, "train")
    assert np.array_equal(read_all(train), expected["train"])


def test_plain_folder_is_read_recursively_in_sorted_order(tmp_path):
    x = images(5, size=6)
    write_pngs(tmp_path, {"b/1.png": x[3], "b/0.png": x[2], "a.png": x[0], "a/z.png": x[1], "c.png": x[4]})
    (tmp_path / "notes.txt").write_text("not an image")
    assert np.array_equal(read_all(open_images(tmp_path)), x)


def test_images_of_several_sizes_go_to_separate_batches(tmp_path):
    write_pngs(tmp_path, {"0.png": images(1, 0, 8)[0], "1.png": images(1, 1, 8)[0], "2.png": images(1, 2, 12)[0]})
    assert [b.shape[:3] for b in open_images(tmp_path).batches(8)] == [(2, 8, 8), (1, 12, 12)]


@pytest.mark.parametrize("mode", ["w", "w:gz"])
def test_tar_is_streamed_by_split(split_folder, tmp_path, mode):
    root, expected = split_folder
    archive = tmp_path / ("data.tar" + (".gz" if mode.endswith("gz") else ""))
    with tarfile.open(archive, mode) as tar:
        tar.add(root, arcname="cifar10-jpeg")
    for split in ("train", "test"):
        got = read_all(open_images(archive, split))
        # Archive order, not sorted order: compare as sets of images.
        assert sorted(map(bytes, got)) == sorted(map(bytes, expected[split]))
    assert open_images(archive, "train", limit=3).count == 3
    assert not list(tmp_path.glob("cifar10-jpeg"))  # nothing extracted


def cifar_batch(n, seed=0):
    data = np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": list(range(n)), b"data": data,
            b"filenames": [b"x.png"] * n}


def test_restricted_unpickler_reads_a_protocol_2_batch():
    batch = cifar_batch(5)
    images_nhwc = read_cifar_batch(pickle.dumps(batch, protocol=2), "batch")
    assert images_nhwc.shape == (5, 32, 32, 3)
    # Rows are the R, G, B planes of 32 x 32.
    assert images_nhwc[3, 4, 7, 1] == batch[b"data"][3, 1024 + 4 * 32 + 7]


class Exploit:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    exploit = Exploit()
    exploit.marker = tmp_path / "pwned"
    raw = pickle.dumps({b"data": exploit}, protocol=2)
    with pytest.raises(DataError, match="refusing to load posix.system|refusing to load os.system"):
        read_cifar_batch(raw, "evil")
    assert not exploit.marker.exists()
    # The plain unpickler would have run it: the test really holds an exploit.
    pickle.loads(raw)
    assert exploit.marker.exists()


def test_cifar_folder_and_tarball_test_split(tmp_path):
    folder = tmp_path / "data" / CIFAR10_FOLDER
    folder.mkdir(parents=True)
    batch = cifar_batch(10_000, seed=3)  # the official batch size
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    expected = batch[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[spread(10_000, 7)]
    source = open_images(tmp_path / "data", limit=7)  # the folder above cifar-10-batches-py, default test
    assert source.count == 7 and np.array_equal(read_all(source), expected)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=CIFAR10_FOLDER)
    assert np.array_equal(read_all(open_images(archive, "test", limit=7)), expected)
    with pytest.raises(DataError, match="data_batch_1"):
        open_images(archive, "train")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: (p / "x.npz").write_bytes(b"not a zip") and p / "x.npz", "not a readable .npz"),
    (lambda p: np.savez(p / "y.npz", y=np.zeros(3)) or p / "y.npz", "no key 'x'"),
    (lambda p: np.savez(p / "f.npz", x=np.zeros((2, 4, 4, 3))) or p / "f.npz", "float64"),
    (lambda p: (p / "e").mkdir() or p / "e", "holds no images"),
    (lambda p: (p / "t.txt").write_text("hello") and p / "t.txt", "is not a samples.npz"),
])
def test_bad_sources_fail_with_one_line(tmp_path, make, message):
    with pytest.raises(DataError, match=message) as info:
        open_images(make(tmp_path))
    assert "\n" not in str(info.value)


def test_corrupt_image_names_the_file(tmp_path):
    write_pngs(tmp_path, {"0.png": images(1)[0]})
    (tmp_path / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="1.png: not a readable image"):
        read_all(open_images(tmp_path))


def test_split_that_is_absent(split_folder, tmp_path):
    root, _ = split_folder
    with pytest.raises(DataError, match="no images in a folder named 'train'"):
        open_images(root / "test", "train")
    np.savez(tmp_path / "s.npz", x=images(2))
    with pytest.raises(DataError, match="--split"):
        open_images(tmp_path / "s.npz", "test")


def test_jpeg_member_decodes_like_pil(tmp_path):
    img = images(1, size=16)[0]
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, format="JPEG", quality=75)
    (tmp_path / "a.jpg").write_bytes(buffer.getvalue())
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    assert np.array_equal(read_all(open_images(tmp_path))[0], expected)


def test_16_bit_pngs_are_scaled_to_8_bits_not_clipped(tmp_path):
    grey = np.array([[0, 257, 4000, 32768], [40000, 65000, 65535, 128]], dtype=np.uint16)
    (tmp_path / "grey.png").write_bytes(png(grey, bit_depth=16))
    got = read_all(open_images(tmp_path))
    # v * 255 / 65535 rounded, by hand; grey becomes three equal channels.
    np.testing.assert_array_equal(got[0, :, :, 0], [[0, 1, 16, 128], [156, 253, 255, 0]])
    assert (got[..., 0] == got[..., 2]).all()


@pytest.mark.parametrize("container", ["folder", "tar"])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, container):
    bomb = png(np.zeros((1, 1), np.uint8), size=(60_000, 60_000))  # 3.6 G pixels claimed, 70 bytes
    (tmp_path / "d").mkdir()
    write_pngs(tmp_path / "d", {"0.png": images(1)[0]})
    (tmp_path / "d" / "1.png").write_bytes(bomb)
    source = tmp_path / "d"
    if container == "tar":
        source = tmp_path / "d.tar.gz"
        with tarfile.open(source, "w:gz") as tar:
            tar.add(tmp_path / "d", arcname="d")
    with pytest.raises(DataError, match="1.png: not a readable image \\(over Pillow's size limit\\)") as info:
        read_all(open_images(source))
    assert "\n" not in str(info.value)


def test_restricted_unpickler_builds_only_numpys_empty_placeholder():
    from engine.evaluation.datasets import CifarUnpickler, _reconstruct
    assert _reconstruct(np.ndarray, (0,), "b").shape == (0,)
    with pytest.raises(pickle.UnpicklingError):
        _reconstruct(np.ndarray, (10**12,), "b")  # would reserve a terabyte before any data was read
    with pytest.raises(pickle.UnpicklingError):
        _reconstruct(np.matrix, (0,), "b")
    # A real array goes through the placeholder and __setstate__.
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(CifarUnpickler(io.BytesIO(pickle.dumps(arr, protocol=2))).load(), arr)


def test_npz_header_claiming_more_than_it_holds_is_refused_unallocated(tmp_path):
    from tests.fuzz.crafted import npz_claiming
    path = npz_claiming(tmp_path / "samples.npz", (10**6, 1000, 1000, 3))  # 3 TB claimed, 64 bytes held
    with pytest.raises(DataError, match=r"its x claims \(1000000, 1000, 1000, 3\) uint8 but holds"):
        open_images(path)
    x = images(2)
    np.savez(tmp_path / "ok.npz", x=x)
    assert np.array_equal(read_all(open_images(tmp_path / "ok.npz")), x)
