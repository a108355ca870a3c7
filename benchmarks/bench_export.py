"""One U-Net forward on the CPU: ONNX Runtime (the exported fp32 file) vs eager PyTorch fp32.

Measured in the same run, for the cifar10-compact and ddpm-cifar10 presets at batch 2 and
32, with random weights (speed does not depend on them). Quick mode, the default and what
CI runs: cifar10-compact at batch 2 with a few rounds, the other cases skipped with the
reason; DDPM_BENCH_FULL=1 runs them all. Nothing here asserts a speed.

Each case is one row (benchmarks/conftest.py `bench`): median, min and max, the TFLOP/s of
the forward (FLOPs from torch's FlopCounterMode) and its fraction of the matmul ceiling
measured in the same run, and for ONNX Runtime the export time, kept apart. On a machine
shared with other jobs, compare the min columns: the medians measure the neighbours.
"""

import os
import time

import pytest
import torch

from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import Checkpoint
from engine.formats.onnx import load_onnx
from engine.formats.onnx_export import export_onnx, random_inputs
from engine.model import UNet
from engine.timing import flops_per_image

FULL = os.environ.get("DDPM_BENCH_FULL") == "1"
QUICK_CASE = ("cifar10-compact", 2)
CASES = [(preset, batch) for preset in ("cifar10-compact", "ddpm-cifar10") for batch in (2, 32)]


def rounds(batch: int) -> int:
    if not FULL:
        return 3
    return 15 if batch <= 2 else 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """preset -> (eager model, ONNX Runtime model, export seconds); each exported once, on first use."""
    cache = {}

    def get(preset: str):
        if preset not in cache:
            torch.manual_seed(0)
            ckpt = Checkpoint(UNet(PRESETS[preset]).eval(), DiffusionConfig(), CIFAR10_CLASSES)
            path = tmp_path_factory.mktemp("bench") / f"{preset}.onnx"
            start = time.perf_counter()
            export_onnx(ckpt, path, fp16=False)  # verified against eager: the times compare equal work
            cache[preset] = (ckpt.unet, load_onnx(path, "cpu").model, time.perf_counter() - start)
        return cache[preset]

    return get


@pytest.mark.parametrize("preset, batch", CASES)
@pytest.mark.parametrize("backend", ["eager-fp32", "onnxruntime"])
def test_forward(bench, models, backend, preset, batch):
    if not FULL and (preset, batch) != QUICK_CASE:
        pytest.skip(f"quick mode runs only {QUICK_CASE[0]} at batch {QUICK_CASE[1]}; set DDPM_BENCH_FULL=1 for all cases")
    eager, onnx_model, export_s = models(preset)
    x, t, y = random_inputs(eager.config, batch, 1, 1000)
    if backend == "eager-fp32":
        def forward():
            with torch.no_grad():
                return eager(x, t, y)
    else:
        def forward():
            return onnx_model(x, t, y)

    extra = {"export_s": round(export_s, 1)} if backend == "onnxruntime" else {}
    bench(forward, what="unet", backend=backend, batch=batch, rounds=rounds(batch),
          flops=flops_per_image(eager.config) * batch, preset=preset, device="cpu",
          torch_threads=torch.get_num_threads(), **extra)
