"""Timing and ceilings shared by the benchmarks.

On CUDA a call is timed with a pair of CUDA events after warm-up; on the CPU with
perf_counter. The first call is timed on its own (it includes compilation, autotuning or
graph capture) and reported apart from the steady state.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

ON_GPU = torch.cuda.is_available()
# CPU runs in a quick mode (few rounds, small sizes) unless DDPM_BENCH_FULL=1.
FULL = ON_GPU or os.environ.get("DDPM_BENCH_FULL") == "1"
WARMUP, ROUNDS = (10, 30) if ON_GPU else (1, 3)
heavy = dict(condition=not FULL, reason="heavy size: runs on the GPU (or with DDPM_BENCH_FULL=1); CPU CI runs the quick mode")


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    first_call_s: float
    rounds: int


def _sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def measure(fn, warmup: int = WARMUP, rounds: int = ROUNDS, cuda_events: bool = ON_GPU) -> Timing:
    """Time fn() `rounds` times after `warmup` calls; the first call is timed separately.

    cuda_events=False for work that runs on the CPU (events would only time the idle GPU stream).
    """
    start = time.perf_counter()
    fn()
    _sync()
    first_call_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    if cuda_events:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        _sync()
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        _sync()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), first_call_s, rounds)


def measure_ceilings() -> dict[str, float]:
    """The machine's own ceilings, measured now: matrix-multiply FLOP/s and copy bytes/s, each
    from the fastest of the rounds (a ceiling is what the hardware can do, not what it did on average)."""
    if ON_GPU:
        n, dtype, copy_bytes = 8192, torch.bfloat16, 1 << 30
    else:
        n, dtype, copy_bytes = 2048, torch.float32, 1 << 26
    device = "cuda" if ON_GPU else "cpu"
    a = torch.randn(n, n, device=device, dtype=dtype)
    matmul = measure(lambda: a @ a, warmup=2, rounds=10)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), warmup=2, rounds=10)
    return {
        "matmul_flop_per_s": 2 * n**3 / (matmul.min_ms * 1e-3),
        "matmul_dtype": str(dtype).removeprefix("torch."),
        # A copy reads and writes every byte.
        "copy_bytes_per_s": 2 * copy_bytes / (copy.min_ms * 1e-3),
    }
