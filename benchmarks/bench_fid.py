"""FID feature extraction on the CPU: ONNX Runtime vs TorchScript, images/s of the TF-Inception.

One row per backend and batch: the Inception forward of 32x32 uint8 images including the
pre-processing (TF1 bilinear resize to 299x299), which is what `ddpm-engine fid` spends its time
on. The export to ONNX (and its check against TorchScript) is reported apart as `load_s`.
Quick mode, the default and what CI runs: batch 8 with 3 rounds; DDPM_BENCH_FULL=1 adds batch
4 and 16. Skipped without the `eval` extra (the network); ONNX Runtime rows without `export`.
On a machine shared with other jobs, compare the min columns.
"""

import os
import time

import numpy as np
import pytest
import torch

from benchmarks.harness import measure
from engine.evaluation import fid

FULL = os.environ.get("DDPM_BENCH_FULL") == "1"
BATCHES = (4, 8, 16)
QUICK_BATCH = 8


@pytest.fixture(scope="module")
def networks():
    """backend -> (InceptionNetwork, load seconds); each loaded once, on first use."""
    if fid.packaged_weights() is None and not os.environ.get(fid.INCEPTION_ENV):
        pytest.skip(f"no Inception network: {fid.INSTALL_HINT}")
    cache = {}

    def get(backend: str):
        if backend not in cache:
            start = time.perf_counter()
            cache[backend] = (fid.load_network(backend=backend), time.perf_counter() - start)
        return cache[backend]

    return get


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("backend", ["torchscript", "onnxruntime"])
def test_inception_features(record, networks, backend, batch):
    if not FULL and batch != QUICK_BATCH:
        pytest.skip(f"quick mode runs batch {QUICK_BATCH} only; set DDPM_BENCH_FULL=1 for {BATCHES}")
    if backend == "onnxruntime" and not fid.onnx_available():
        pytest.skip("onnx and onnxruntime (the export extra) are not installed")
    network, load_s = networks(backend)
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    timing = measure(lambda: network(images), rounds=6 if FULL else 3, cuda_events=False)
    record(what="fid-features", backend=backend, batch=batch, timing=timing, shape="32x32->299x299", device="cpu",
           images_per_s=round(batch / (timing.median_ms * 1e-3), 2),
           images_per_s_best=round(batch / (timing.min_ms * 1e-3), 2), load_s=round(load_s, 1),
           torch_threads=torch.get_num_threads())
