"""One U-Net forward on the CPU: ONNX Runtime (the exported fp32 file) vs eager PyTorch fp32.

Measured in the same run, for the cifar10-compact and ddpm-cifar10 presets at batch 2 and
32, with random weights (speed does not depend on them). Quick mode, the default and what
CI runs: cifar10-compact at batch 2 with a few rounds, the other cases skipped with the
reason; DDPM_BENCH_FULL=1 runs them all. Nothing here asserts a speed.

Each case reports pytest-benchmark's times, and in extra_info the GFLOP of the forward
(torch's FlopCounterMode), the GFLOP/s achieved and its fraction of this machine's fp32
matmul rate measured at the start (the ceiling), the thread counts, and for ONNX Runtime
the export time (kept apart from the forward times) and the speed-up over eager. On a
machine shared with other jobs, compare the min columns: the medians measure the neighbours.
"""

import os
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.checkpoint import Checkpoint
from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.model import UNet
from export.onnx_export import export_onnx, random_inputs
from export.onnx_runtime import load_onnx

FULL = os.environ.get("DDPM_BENCH_FULL") == "1"
QUICK_CASE = ("cifar10-compact", 2)
CASES = [(preset, batch) for preset in ("cifar10-compact", "ddpm-cifar10") for batch in (2, 32)]


def rounds(batch: int) -> int:
    if not FULL:
        return 3
    return 15 if batch <= 2 else 6


@pytest.fixture(scope="module")
def matmul_gflops() -> float:
    """The ceiling: fp32 GFLOP/s of a 2048^3 matmul on this CPU, best of 25 (on a shared machine the median is
    set by the neighbours, the best by the hardware)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(25):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


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
            cache[preset] = (ckpt.model, load_onnx(path, "cpu").model, time.perf_counter() - start)
        return cache[preset]

    return get


def gflop_per_forward(model: UNet, batch: int) -> float:
    x, t, y = random_inputs(model.config, 1, 0, 1000)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y)
    return counter.get_total_flops() * batch / 1e9


TIMES: dict[tuple[str, int, str], tuple[float, float]] = {}  # (min, median) seconds


@pytest.mark.parametrize("preset, batch", CASES)
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
def test_forward(benchmark, models, matmul_gflops, backend, preset, batch):
    if not FULL and (preset, batch) != QUICK_CASE:
        pytest.skip(f"quick mode runs only {QUICK_CASE[0]} at batch {QUICK_CASE[1]}; set DDPM_BENCH_FULL=1 for all cases")
    eager, onnx_model, export_s = models(preset)
    x, t, y = random_inputs(eager.config, batch, 1, 1000)
    if backend == "eager":
        def forward():
            with torch.no_grad():
                return eager(x, t, y)
    else:
        def forward():
            return onnx_model(x, t, y)

    benchmark.group = f"{preset} batch {batch}"
    benchmark.pedantic(forward, rounds=rounds(batch), warmup_rounds=1, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: ran once, nothing measured
        return
    best, median = benchmark.stats.stats.min, benchmark.stats.stats.median
    gflop = gflop_per_forward(eager, batch)
    TIMES[preset, batch, backend] = best, median
    info = {"gflop": round(gflop, 2), "gflop_per_s_at_min": round(gflop / best, 1),
            "matmul_peak_gflop_per_s": round(matmul_gflops, 1),
            "fraction_of_peak_at_min": round(gflop / best / matmul_gflops, 3),
            "torch_threads": torch.get_num_threads()}
    if backend == "onnxruntime":
        info["export_s"] = round(export_s, 1)
        if (preset, batch, "eager") in TIMES:
            eager_best, eager_median = TIMES[preset, batch, "eager"]
            info["speedup_vs_eager_min"] = round(eager_best / best, 2)
            info["speedup_vs_eager_median"] = round(eager_median / median, 2)
    benchmark.extra_info.update(info)
