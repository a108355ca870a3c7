"""Timing primitives shared by `ddpm-engine bench` (engine/apps/bench.py) and the benchmark suite
(benchmarks/): a timed function's median/min/max (`measure`, `Timing`), one guided sampling step as a
no-argument function (`step_fn`), and the FLOPs of one U-Net call (`flops_per_image`).

Times: CUDA events on the GPU after warm-up, perf_counter on the CPU; the first call (compilation,
autotuning or graph capture) is reported apart.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from engine.config import ModelConfig
from engine.core import Engine
from engine.model import UNet
from engine.noise import image_keys
from engine.settings import SampleSettings

# name -> (backend, precision) for engine.backends.build_engine
BENCH_BACKENDS = {
    "eager-fp32": ("eager", "fp32"),
    "eager-bf16": ("eager", "bf16"),
    "compile": ("compile", "auto"),
    "fused": ("fused", "auto"),
    "onnx": ("onnx", "fp32"),
}


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    first_call_s: float
    rounds: int

    @classmethod
    def of(cls, times_ms: list[float], first_call_s: float) -> Timing:
        """The median, min and max of the rounds' times."""
        return cls(statistics.median(times_ms), min(times_ms), max(times_ms), first_call_s, len(times_ms))


def measure(fn, warmup: int, rounds: int, cuda_events: bool) -> Timing:
    """Time fn() `rounds` times after `warmup` calls (the first of which is timed on its own: it
    includes compilation, autotuning or graph capture).

    cuda_events: time GPU work with a pair of CUDA events a call; False for work on the CPU
    (events would only time the idle GPU stream), timed with perf_counter.
    """
    sync = torch.cuda.synchronize if cuda_events else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first_call_s = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    if cuda_events:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(rounds)]
        sync()
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        sync()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    return Timing.of(times, first_call_s)


@functools.lru_cache(maxsize=None)
def flops_per_image(config: ModelConfig) -> float:
    from torch.utils.flop_counter import FlopCounterMode  # imports triton where installed: ~0.15 s of every start-up

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        UNet(config).eval()(torch.zeros(1, config.in_channels, config.image_size, config.image_size),
                            torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
    return float(counter.get_total_flops())


def step_fn(engine: Engine, settings: SampleSettings, images: int, config: ModelConfig) -> Callable[[], object]:
    """A no-argument function running one guided step on `images` images (U-Net batch 2 x images)."""
    labels = torch.arange(images) % config.num_classes
    return engine.fixed_step(settings, labels, image_keys(0, torch.arange(images)))
