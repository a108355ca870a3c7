"""Timing defaults and ceilings shared by the benchmarks; the timer is engine.timing.measure
(the one `ddpm-engine bench` uses): CUDA events on the GPU after warm-up, perf_counter on
the CPU, the first call (compilation, autotuning, graph capture) reported apart."""

from __future__ import annotations

import os

import torch

from engine.timing import Timing
from engine.timing import measure as engine_measure

ON_GPU = torch.cuda.is_available()
# CPU runs in a quick mode (few rounds, small sizes) unless DDPM_BENCH_FULL=1.
FULL = ON_GPU or os.environ.get("DDPM_BENCH_FULL") == "1"
WARMUP, ROUNDS = (10, 30) if ON_GPU else (1, 3)
heavy = dict(condition=not FULL, reason="heavy size: runs on the GPU (or with DDPM_BENCH_FULL=1); CPU CI runs the quick mode")


def measure(fn, warmup: int = WARMUP, rounds: int = ROUNDS, cuda_events: bool = ON_GPU) -> Timing:
    """engine.timing.measure with this suite's defaults: CUDA events on the GPU, quick rounds on the CPU."""
    return engine_measure(fn, warmup, rounds, cuda_events)


def measure_ceilings() -> dict[str, float]:
    """The machine's own ceilings, measured now: compute FLOP/s and copy bytes/s, each from the fastest
    of the rounds (a ceiling is what the hardware can do, not what it did on average). Compute is a
    matrix multiply, and on the CPU the faster of that and a 3x3 convolution (oneDNN, channels_last,
    the U-Net's own kind of work): on this project's AMD CPU MKL's 2048^2 GEMM runs at ~70 % of
    oneDNN's convolutions, which made U-Nets look faster than the ceiling."""
    if ON_GPU:
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = 2048, torch.float32, 1 << 26
    device = "cuda" if ON_GPU else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    matmul = 2 * n**3 / (measure(lambda: a @ a, warmup=2, rounds=10).min_ms * 1e-3)
    compute, kernel = matmul, f"{n}^2 matmul"
    if not ON_GPU:
        x = torch.randn(16, 256, 16, 16).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            conv = measure(lambda: torch.nn.functional.conv2d(x, w, padding=1), warmup=2, rounds=10)
        conv_rate = 2 * 16 * 16 * 16 * 256 * 256 * 9 / (conv.min_ms * 1e-3)
        if conv_rate > matmul:
            compute, kernel = conv_rate, "3x3 conv, 256 channels"
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), warmup=2, rounds=10)
    return {
        "compute_flop_per_s": compute,
        "compute_kernel": kernel,
        "compute_dtype": str(dtype).removeprefix("torch."),
        # A copy reads and writes every byte.
        "copy_bytes_per_s": 2 * copy_bytes / (copy.min_ms * 1e-3),
    }
