"""`ddpm-engine bench`: one guided sampling step per backend and batch size, in the same run.

A step is what the sampler does per timestep: the U-Net on the batch of 2B (conditional and
unconditional halves), the guidance combine, the per-image noise and the DDPM update
(engine.core.Engine.fixed_step); for the fused backend on CUDA it is one CUDA-graph replay
of exactly that. `batch` is the U-Net batch (images
x2 under guidance). images/s is for a whole run of `steps` steps.
Random weights (speed does not depend on them). Times: CUDA events on the GPU after
warm-up, perf_counter on the CPU; the first call (compilation, autotuning, graph capture)
is reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.backends import BackendError, build_engine
from engine.config import CIFAR10_CLASSES, DiffusionConfig, ModelConfig
from engine.errors import ConfigError
from engine.formats.checkpoint import Checkpoint
from engine.model import UNet
from engine.settings import SampleSettings
from engine.timing import BENCH_BACKENDS, flops_per_image, measure, step_fn


@dataclass
class Row:
    backend: str
    batch: int
    step_ms: float        # median
    step_ms_min: float
    step_ms_max: float
    first_call_s: float
    images_per_s: float   # (batch / 2) images through `steps` steps
    tflop_per_s: float


def bench(preset: str, batch_sizes: list[int], backends: list[str], device: torch.device, steps: int = 1000,
          warmup: int | None = None, rounds: int | None = None, cpu_budget_s: float = 20.0,
          log=print) -> tuple[list[Row], list[str]]:
    """Measure every (backend, batch); returns the rows and one line per skipped case."""
    config = ModelConfig.from_name(preset)
    on_gpu = device.type == "cuda"
    warmup = (10 if on_gpu else 1) if warmup is None else warmup
    rounds = (30 if on_gpu else 3) if rounds is None else rounds
    for b in batch_sizes:
        if b < 2 or b % 2:
            raise ConfigError(f"batch {b}: the U-Net batch under guidance is 2 x images, so it must be even and >= 2")
    torch.manual_seed(0)
    ckpt = Checkpoint(UNet(config).eval().to(device), DiffusionConfig(), CIFAR10_CLASSES)
    settings = SampleSettings(sampler="ddpm", steps=steps)  # the default guidance
    flops = flops_per_image(config)
    rows, skipped = [], []
    ms_per_image = None  # eager fp32 cost per image on the CPU, to skip cases over the budget
    for name in backends:
        kind, precision = BENCH_BACKENDS[name]
        if kind == "fused" and not on_gpu:
            skipped.append(f"{name}: needs CUDA (the Triton interpreter on the CPU is for tests, not timing)")
            continue
        try:
            engine = build_engine(ckpt, kind, device, precision, max_batch=max(batch_sizes) // 2,
                                  image_steps=max(batch_sizes) // 2 * steps)
        except BackendError as e:
            skipped.append(f"{name}: {e}")
            continue
        for batch in batch_sizes:
            if not on_gpu and ms_per_image is not None:
                estimate_s = ms_per_image * batch * (warmup + rounds + 1) / 1e3
                if estimate_s > cpu_budget_s:
                    skipped.append(f"{name} batch {batch}: ~{estimate_s:.0f} s on this CPU (estimated from eager fp32 "
                                   f"at batch {batch_sizes[0]}), over --cpu-budget-s {cpu_budget_s:g}")
                    continue
            t = measure(step_fn(engine, settings, batch // 2, config), warmup, rounds, cuda_events=on_gpu)
            if ms_per_image is None:
                ms_per_image = t.median_ms / batch
            row = Row(engine.name, batch, t.median_ms, t.min_ms, t.max_ms, t.first_call_s,
                      (batch // 2) / (t.median_ms * 1e-3 * steps), flops * batch / (t.median_ms * 1e-3) / 1e12)
            rows.append(row)
            log(format_row(row))
    return rows, skipped


def format_header() -> str:
    return f"{'backend':<14} {'batch':>6} {'step ms (min-max)':>24} {'images/s':>10} {'TFLOP/s':>8} {'first call s':>12}"


def format_row(r: Row) -> str:
    spread = f"{r.step_ms:.3f} ({r.step_ms_min:.3f}-{r.step_ms_max:.3f})"
    return f"{r.backend:<14} {r.batch:>6} {spread:>24} {r.images_per_s:>10.2f} {r.tflop_per_s:>8.3f} {r.first_call_s:>12.2f}"
