"""The Runner: the reverse process over one batch of images, from x_T to x_0.

A Runner holds everything fixed for a run (the eps model of a backend, the sampler's plan on
the device, the guidance scale) and is built in one place, engine.backends.build_runner. Its
`step` is the one step body every path runs:

    eps = (1 + w) eps(x, c) - w eps(x, null)          the U-Net on ONE batch of 2B (sampler.guided_eps)
    z   = per-image noise of step i                   (noise.gaussian_noise, keyed by image)
    x  <- c_x0 x0_hat + c_xt x + c_eps eps + sigma z   (sampler.step)

A Runner loops over the steps in Python; with `graphs` (the fused backend on CUDA) it hands the
batch to engine.graphs.StepGraphs, which replays the same step as one CUDA graph per step. The
benchmarks time `one_step`, which is the same step again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from engine.noise import INITIAL_STREAM, gaussian_noise
from engine.sampler import SamplerPlan, guided_eps, step

if TYPE_CHECKING:
    from engine.graphs import StepGraphs


@dataclass
class Runner:
    name: str                          # what runs, e.g. "onnx-fp32" or "fused-bf16"
    model: Callable                    # eps(x, t, y): float32 in, float32 out
    plan: SamplerPlan                  # on the model's device
    shape: tuple[int, int, int]        # (C, H, W) of an image
    null_class: int
    guidance: float = 0.0
    clip_x0: bool = False
    graphs: StepGraphs | None = None   # one CUDA graph per batch bucket (the fused backend)

    @property
    def device(self) -> torch.device:
        return self.plan.timesteps.device

    def step(self, i: int | torch.Tensor, x: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """x_{t_i} -> x_{t_{i-1}}. i: a Python int, or a (1,) device tensor (CUDA graphs: no host read)."""
        t = self.plan.timesteps[i].expand(len(x))
        eps = guided_eps(self.model, x, t, labels, self.guidance, self.null_class).float()
        return step(self.plan, i, x, eps, gaussian_noise(keys, i, self.shape), self.clip_x0)

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, keys: torch.Tensor, x_T: torch.Tensor | None = None,
                 on_step: Callable[[], object] | None = None) -> torch.Tensor:
        """x_0 (float32, nominally in [-1, 1]) of the images with these labels and noise keys, from
        x_T drawn from the keys unless given."""
        if self.graphs is not None:
            return self.graphs.run(self, labels, keys, x_T, on_step)
        x = gaussian_noise(keys, INITIAL_STREAM, self.shape) if x_T is None else x_T.float()
        for i in reversed(range(self.plan.num_steps)):
            x = self.step(i, x, labels, keys)
            if on_step is not None:
                on_step()
        return x

    def one_step(self, labels: torch.Tensor, keys: torch.Tensor) -> Callable[[], object]:
        """A no-argument function running one step on this batch (for the benchmarks): a graph
        replay with `graphs`, else the step at the middle of the plan."""
        if self.graphs is not None:
            advance, _ = self.graphs.prepare(self, labels, keys)
            return advance  # counts down from step S - 1: fine for fewer than S calls
        x = gaussian_noise(keys, 0, self.shape)
        i = self.plan.num_steps // 2
        return torch.no_grad()(lambda: self.step(i, x, labels, keys))
