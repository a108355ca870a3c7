"""The CPU runtimes behind `--backend auto` (the table in engine/backends.py), side by side (issue 23,
item 2).

For each model size the engine runs on the CPU (the bundled cifar10-cpu, 2.25M parameters; cifar10-compact,
6.5M; the paper's ddpm-cifar10, 35.7M) and U-Net batches around the CPU's sampling batch (2 x 32 images under
guidance), one U-Net call through each runtime, in interleaved rounds in one process (so a busy moment of
this shared machine costs every runtime alike):
- contiguous: the reference UNet in its default memory layout (what diffusers runs);
- eager-fp32: `--backend eager` (channels_last on the CPU);
- onnx-fp32: `--backend onnx` (ONNX Runtime's CPU provider, graph exported and verified once);
- eager-bf16: `--backend eager --precision bf16`, on CPUs with bf16 instructions only (elsewhere emulated).
Rows: what="runtime", ms per call (min and median of the rounds) and per image. Quick mode (CI): the tiny
preset at batch 2, one round. Never asserts a speed.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from benchmarks.harness import FULL
from engine.backends import build_engine, native_cpu_bf16, onnxruntime_installed
from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import Checkpoint
from engine.model import UNet
from engine.timing import Timing, flops_per_image

CASES = {"cifar10-cpu": (32, 64, 128), "cifar10-compact": (16, 64), "ddpm-cifar10": (8, 16, 32)} if FULL else {"tiny": (2,)}
ROUNDS = 6 if FULL else 1


def runtimes(preset: str) -> dict:
    """name -> eps(x, t, y) of one random-weight model of `preset` (seed 0)."""
    torch.manual_seed(0)
    unet = UNet(PRESETS[preset]).eval()
    reference = copy.deepcopy(unet)  # the engine converts its own copy to channels_last
    ckpt = Checkpoint(unet, DiffusionConfig(), CIFAR10_CLASSES)
    found = {"contiguous": torch.no_grad()(reference), "eager-fp32": build_engine(ckpt, "eager", precision="fp32").model}
    if onnxruntime_installed():
        found["onnx-fp32"] = build_engine(ckpt, "onnx").model
    if native_cpu_bf16():
        found["eager-bf16"] = build_engine(ckpt, "eager", precision="bf16").model
    return found


@pytest.mark.parametrize("preset", list(CASES))
def test_cpu_runtimes(record, preset, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("the CPU's runtimes: bench_sample.py measures the GPU's")
    monkeypatch.setenv("DDPM_ENGINE_CACHE", str(tmp_path))  # ONNX graphs of random weights: not the user's cache
    models = runtimes(preset)
    config = PRESETS[preset]
    for batch in CASES[preset]:
        g = torch.Generator().manual_seed(batch)
        x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        y = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
        seconds: dict[str, list[float]] = {name: [] for name in models}
        first: dict[str, float] = {}
        for round_ in range(ROUNDS + 1):  # round 0 warms up (and is reported as the first call)
            for name, model in models.items():
                start = time.perf_counter()
                model(x, t, y)
                elapsed = time.perf_counter() - start
                if round_:
                    seconds[name].append(elapsed)
                else:
                    first[name] = elapsed
        for name, times in seconds.items():
            timing = Timing.of([t * 1e3 for t in times], first[name])
            record(what="runtime", backend=name, preset=preset, batch=batch, timing=timing,
                   flops=flops_per_image(config) * batch, min_ms_per_image=round(timing.min_ms / batch, 2),
                   median_ms_per_image=round(timing.median_ms / batch, 2))
