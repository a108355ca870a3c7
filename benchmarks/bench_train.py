"""Training throughput: images/s of one optimizer step (forward, backward, AdamW, EMA).

On the CPU: the tiny preset at batch 8, eager fp32 (a quick check that the step runs), and the
bundled model's preset (cifar10-cpu) at the trainer's default batch (128) against the batch its
CPU recipe uses (32), contiguous and channels_last, fp32 and bf16 autocast, in the same run
(DDPM_BENCH_FULL=1; quick mode runs batch 32 fp32 only). On CUDA: ddpm-cifar10 at batch 128, eager fp32 against the fast path (bf16 autocast +
channels_last + torch.compile), in the same run; compile time is reported separately.
Nothing here asserts a speed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.harness import FULL, ON_GPU
from engine.config import PRESETS, DiffusionConfig, ModelConfig
from engine.diffusion import alpha_bar as make_alpha_bar
from engine.model import UNet, count_parameters
from engine.timing import flops_per_image
from training.recipe import optimize

CUDA = torch.cuda.is_available()
# A training step costs about three forwards: the forward, and a backward of twice its FLOPs.
TRAIN_FLOPS_PER_FORWARD = 3


def make_step(preset: str, batch: int, device: str, fast: bool, channels_last: bool | None = None,
              bf16: bool | None = None):
    """fast: bf16 autocast + channels_last + torch.compile; channels_last/bf16 override its parts."""
    config = ModelConfig.from_name(preset)
    memory_format = torch.channels_last if (fast if channels_last is None else channels_last) else torch.contiguous_format
    bf16 = fast if bf16 is None else bf16
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
        loss, _ = optimize(net, model, ema, optimizer, x0, y, t, noise, alpha_bar, bf16=bf16, lr=1e-4,
                           grad_clip=1.0, ema_beta=0.9999)
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, count_parameters(model)


def test_train_step_tiny_cpu(bench):
    step, params = make_step("tiny", 8, "cpu", fast=False)
    row = bench(step, what="train", backend="eager-fp32", batch=8, preset="tiny", params=params, device="cpu",
                flops=TRAIN_FLOPS_PER_FORWARD * flops_per_image(PRESETS["tiny"]) * 8)
    print(f"tiny batch 8 on cpu (eager fp32): {8 / (row['ms_median'] * 1e-3):.1f} images/s")


CPU_RATES: dict[str, float] = {}


@pytest.mark.parametrize("batch, layout, precision", [
    (128, "contiguous", "fp32"), (32, "contiguous", "fp32"), (32, "channels_last", "fp32"), (64, "contiguous", "fp32"),
    (32, "contiguous", "bf16"), (32, "channels_last", "bf16"), (64, "channels_last", "bf16"),
])
def test_train_step_cpu_preset(bench, batch, layout, precision):
    """bf16: autocast (float32 master weights, AdamW and EMA), as `ddpm-train --precision bf16`."""
    if ON_GPU:
        pytest.skip("CPU rows: the GPU machine's time goes to the CUDA rows")
    if not FULL and (batch, layout, precision) != (32, "contiguous", "fp32"):
        pytest.skip("quick mode runs cifar10-cpu at batch 32 fp32 only; set DDPM_BENCH_FULL=1 for the comparison")
    step, params = make_step("cifar10-cpu", batch, "cpu", fast=False, channels_last=layout == "channels_last",
                             bf16=precision == "bf16")
    row = bench(step, what="train", backend=f"eager-{precision}-{layout}", batch=batch, preset="cifar10-cpu",
                params=params, device="cpu", layout=layout, rounds=5 if FULL else 3,
                flops=TRAIN_FLOPS_PER_FORWARD * flops_per_image(PRESETS["cifar10-cpu"]) * batch)
    CPU_RATES[f"{batch}-{layout}-{precision}"] = rate = batch / (row["ms_median"] * 1e-3)
    row["images_per_s"] = round(rate, 1)
    if "128-contiguous-fp32" in CPU_RATES:
        print(f"cifar10-cpu batch {batch} {layout} {precision}: {rate / CPU_RATES['128-contiguous-fp32']:.2f}x "
              f"batch 128 contiguous fp32")


RATES: dict[bool, float] = {}


@pytest.mark.skipif(not CUDA, reason="ddpm-cifar10 at batch 128 needs CUDA (35.7M parameters: minutes per step on this CPU)")
@pytest.mark.parametrize("fast", [False, True], ids=["eager-fp32", "bf16-channels_last-compile"])
def test_train_step_cifar10_cuda(bench, fast):
    step, params = make_step("ddpm-cifar10", 128, "cuda", fast)
    row = bench(step, what="train", backend="bf16-channels_last-compile" if fast else "eager-fp32", batch=128,
                preset="ddpm-cifar10", params=params, warmup=3, rounds=20,
                flops=TRAIN_FLOPS_PER_FORWARD * flops_per_image(PRESETS["ddpm-cifar10"]) * 128)
    RATES[fast] = 128 / (row["ms_median"] * 1e-3)
    row["images_per_s"] = round(RATES[fast], 1)
    if len(RATES) == 2:
        print(f"fast path / eager fp32: {RATES[True] / RATES[False]:.2f}x (target on the H200: >= 3x)")
