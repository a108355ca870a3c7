"""Training throughput: images/s of one optimizer step (forward, backward, AdamW, EMA).

On the CPU: the tiny preset at batch 8, eager fp32 (a quick check that the step runs).
On CUDA: ddpm-cifar10 at batch 128, eager fp32 against the fast path (bf16 autocast +
channels_last + torch.compile), in the same run; compile time is reported separately.
Nothing here asserts a speed.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from engine.config import DiffusionConfig, ModelConfig
from engine.diffusion import alpha_bar as make_alpha_bar
from engine.model import UNet, count_parameters
from training.train import optimize

CUDA = torch.cuda.is_available()


def make_step(preset: str, batch: int, device: str, fast: bool):
    config = ModelConfig.from_name(preset)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    torch.manual_seed(0)
    model = UNet(config).to(device, memory_format=memory_format).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    net = torch.compile(model) if fast else model
    alpha_bar = make_alpha_bar(DiffusionConfig()).to(device, torch.float32)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    x0 = (torch.rand(shape, device=device) * 2 - 1).contiguous(memory_format=memory_format)
    noise = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    t = torch.randint(0, 1000, (batch,), device=device)
    y = torch.randint(0, config.num_classes + 1, (batch,), device=device)

    def step():
        loss, _ = optimize(net, model, ema, optimizer, x0, y, t, noise, alpha_bar, bf16=fast, lr=1e-4,
                           grad_clip=1.0, ema_beta=0.9999)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, count_parameters(model)


def run(benchmark, preset: str, batch: int, device: str, fast: bool, rounds: int, warmup: int):
    step, params = make_step(preset, batch, device, fast)
    start = time.perf_counter()
    step()  # first call: compilation (fast path) or allocator/oneDNN warm-up
    first = time.perf_counter() - start
    for _ in range(warmup):
        step()
    benchmark.pedantic(step, rounds=rounds, iterations=1)
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: the step ran once, nothing to report
        return None
    stats = benchmark.stats.stats
    rate = batch / stats.median
    benchmark.extra_info.update(preset=preset, batch=batch, device=device, fast=fast, params=params,
                                images_per_s=round(rate, 1), first_step_s=round(first, 2))
    print(f"\n{preset} batch {batch} on {device} ({'bf16+channels_last+compile' if fast else 'eager fp32'}): "
          f"{rate:.1f} images/s (median step {stats.median * 1e3:.1f} ms, IQR {stats.iqr * 1e3:.1f} ms); "
          f"first step {first:.2f} s")
    return rate


def test_train_step_tiny_cpu(benchmark):
    run(benchmark, "tiny", 8, "cpu", fast=False, rounds=5, warmup=1)


RATES: dict[bool, float] = {}


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [False, True], ids=["eager-fp32", "bf16-channels_last-compile"])
def test_train_step_cifar10_cuda(benchmark, fast):
    if not CUDA:
        pytest.skip("ddpm-cifar10 at batch 128 needs CUDA (35.7M parameters: minutes per step on this CPU)")
    RATES[fast] = run(benchmark, "ddpm-cifar10", 128, "cuda", fast, rounds=20, warmup=3)
    if len(RATES) == 2 and None not in RATES.values():
        print(f"fast path / eager fp32: {RATES[True] / RATES[False]:.2f}x (target on the H200: >= 3x)")
