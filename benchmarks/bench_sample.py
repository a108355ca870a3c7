"""Sampling: the fused backend against the baselines, measured in the same run (issue 5).

Rows (see benchmarks/conftest.py's `record`):
- what="unet": one guided sampling step (the U-Net on the 2B batch, the guidance combine,
  the noise and the update; for the fused backend one CUDA-graph replay of exactly that) per
  backend at U-Net batch 2, 256, 1024 for ddpm-cifar10 and 2, 256 for ddpm-stl10;
- what="sample": the whole `-n 1000` run with guidance, DDPM 1000 steps and DDIM 50
  steps, eager fp32 vs fused.
On the CPU, the quick mode: the tiny preset at batch 2, a few rounds; fused (Triton
kernels, CUDA graphs) and the heavy sizes are skipped with the reason. Never asserts a speed.
"""

import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from benchmarks.harness import FULL, ON_GPU, Timing, heavy, measure
from engine.backends import BackendError, build_engine
from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import Checkpoint
from engine.formats.opener import BUNDLED_CHECKPOINT
from engine.generate import generate
from engine.model import UNet
from engine.settings import SampleSettings
from engine.timing import BENCH_BACKENDS, flops_per_image, step_fn

DEVICE = torch.device("cuda" if ON_GPU else "cpu")
STEP_CASES = [("ddpm-cifar10", b) for b in (2, 256, 1024)] + [("ddpm-stl10", b) for b in (2, 256)]
if not ON_GPU:  # the bundled model at the CPU's sampling batches (U-Net batch = 2 x images)
    STEP_CASES += [("cifar10-cpu", b) for b in (64, 128, 256)]
QUICK = ("tiny", 2)
SETTINGS = SampleSettings(sampler="ddpm")  # all T steps, the default guidance
_MODELS: dict = {}


def checkpoint(preset: str) -> Checkpoint:
    if preset not in _MODELS:
        torch.manual_seed(0)
        _MODELS[preset] = Checkpoint(UNet(PRESETS[preset]).eval().to(DEVICE), DiffusionConfig(), CIFAR10_CLASSES)
    return _MODELS[preset]


def skip_reason(backend: str) -> str | None:
    if backend == "fused" and not ON_GPU:
        return "fused needs CUDA (the Triton interpreter on the CPU is for tests, not timing)"
    if backend == "eager-bf16" and not ON_GPU:
        return "bf16 convolutions have no fast CPU path; measured on the GPU"
    if backend == "onnx" and ON_GPU:
        # ~12 s a call at U-Net batch 1024: these rows alone would take the stage's whole budget.
        return "ONNX Runtime has only its CPU provider on the GPU machine; bench_export.py measures it on the CPU"
    return None


@pytest.mark.parametrize("backend", list(BENCH_BACKENDS))
@pytest.mark.parametrize("preset, batch", [QUICK, *STEP_CASES], ids=lambda v: str(v))
def test_step(record, preset, batch, backend):
    if (preset, batch) != QUICK and not FULL:
        pytest.skip(heavy["reason"])
    if (preset, batch) == QUICK and ON_GPU:
        pytest.skip("the quick CPU case; the GPU runs the real presets")
    if reason := skip_reason(backend):
        pytest.skip(reason)
    ckpt = checkpoint(preset)
    kind, precision = BENCH_BACKENDS[backend]
    try:
        engine = build_engine(ckpt, kind, DEVICE, precision, max_batch=batch // 2)
    except BackendError as e:
        pytest.skip(str(e))
    timing = measure(step_fn(engine, SETTINGS, batch // 2, ckpt.config))
    record(what="unet", backend=backend, batch=batch, timing=timing,
           flops=flops_per_image(ckpt.config) * batch, preset=preset, runs=engine.name, guidance=SETTINGS.guidance)


@pytest.mark.skipif(**heavy)
@pytest.mark.parametrize("backend", ["eager-fp32", "fused"])
@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", 1000)])
def test_sample_1000(record, backend, sampler, steps):
    """`ddpm-engine sample -n 1000` with guidance 1.8, ddpm-cifar10, batch 500 (one U-Net batch of 1000)."""
    if reason := skip_reason(backend):
        pytest.skip(reason)
    if backend == "eager-fp32" and steps == 1000 and os.environ.get("DDPM_BENCH_SLOW") != "1":
        pytest.skip("eager fp32 DDPM-1000 takes ~5 min a run on an H200: estimate it as 20x the DDIM-50 row "
                    "(DDPM_BENCH_SLOW=1 runs it)")
    ckpt = checkpoint("ddpm-cifar10")
    kind, precision = BENCH_BACKENDS[backend]
    engine = build_engine(ckpt, kind, DEVICE, precision, max_batch=500)
    settings = replace(SETTINGS, sampler=sampler, steps=steps)
    run = lambda: generate(engine, settings, torch.arange(1000), list(range(10)), 0, progress=False)
    timing = measure(run, warmup=0, rounds=3 if steps <= 50 else 1)  # the first call (capture) is timed apart
    record(what="sample", backend=backend, batch=1000, timing=timing, sampler=sampler, steps=steps,
           images_per_s=round(1000 / (timing.median_ms * 1e-3), 1), runs=engine.name)


def run_sample_cli(out, *args) -> tuple[float, str]:
    """Wall seconds of a whole `ddpm-engine sample` process (start-up and writing included), and
    what it says ran (e.g. "onnx-fp32")."""
    if not BUNDLED_CHECKPOINT.is_file():
        pytest.skip(f"no bundled model at {BUNDLED_CHECKPOINT}")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "engine.apps.cli", "sample", "--out", str(out), "--no-progress", *args],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    return seconds, result.stdout.split("; ")[-1].split(" on ")[0]


def once(seconds: float) -> Timing:
    return Timing(median_ms=seconds * 1e3, min_ms=seconds * 1e3, max_ms=seconds * 1e3, first_call_s=seconds, rounds=1)


@pytest.mark.skipif(**heavy)
def test_bundled_default_sample(record, tmp_path):
    """`ddpm-engine sample` with no flags, as a user runs it after `pip install -e .`: the bundled
    model, 10 images per class, the default sampler; wall time of the whole process, start-up and
    writing included (the bundled-model issue's goal on our 2-core CPU: <= 60 s)."""
    seconds, runs = run_sample_cli(tmp_path / "samples")
    record(what="sample-cli", backend=runs, batch=100, timing=once(seconds), preset="cifar10-cpu",
           sampler=SampleSettings().sampler, device=str(DEVICE), wall_s=round(seconds, 1))


@pytest.mark.skipif(**heavy)
@pytest.mark.parametrize("sampler, steps, backend, precision", [
    ("ddim", 50, "eager", "fp32"), ("ddim", 50, "onnx", "fp32"), ("dpm++2m", 20, "eager", "fp32"),
    ("dpm++2m", 20, "onnx", "fp32"), ("dpm++2m", 20, "eager", "bf16"), ("dpm++2m", 15, "onnx", "fp32"),
    ("dpm++2m", 10, "onnx", "fp32"),
], ids=lambda v: str(v))
def test_bundled_sample_100(record, tmp_path, sampler, steps, backend, precision):
    """`ddpm-engine sample -n 100` of the bundled model per sampler, runtime and precision, side by
    side (the fast-sampling issue's goal: the default at most 1/3 of the wall time of DDIM-50 on
    eager fp32). The ONNX graph is exported into the cache before timing (what every run after a
    model's first sees)."""
    if backend == "onnx":
        run_sample_cli(tmp_path / "warm", "-n", "1", "--steps", "1", "--backend", "onnx")
    seconds, runs = run_sample_cli(tmp_path / "samples", "-n", "100", "--sampler", sampler, "--steps", str(steps),
                                   "--backend", backend, "--precision", precision)
    record(what="sample-cli", backend=runs, batch=100, timing=once(seconds), preset="cifar10-cpu", sampler=sampler,
           steps=steps, device=str(DEVICE), wall_s=round(seconds, 1))
