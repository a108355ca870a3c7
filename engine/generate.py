"""The sampling loop: N images from a checkpoint, in batches, with per-image seeds; interpolation.

`generate` splits the images into batches; a `Runner` runs the reverse process over one batch,
from x_T to x_0. A Runner holds everything fixed for a run (the eps model of a backend, the
sampler's plan on the device, the guidance scale) and is built in one place,
engine.backends.build_runner. Its `step` is the one step body every path runs:

    eps = (1 + w) eps(x, c) - w eps(x, null)          the U-Net on ONE batch of 2B (guided_eps)
    z   = per-image noise of step i                   (noise.gaussian_noise, keyed by image)
    x  <- c_x0 x0_hat + c_xt x + c_eps eps + c_prev x0_hat_prev + sigma z   (sampler.step)

A Runner loops over the steps in Python; with `graphs` (the fused backend on CUDA) it hands the
batch to engine.graphs.StepGraphs, which replays the same step as one CUDA graph per step. The
benchmarks time `one_step`, the same step again.

Image i of a run has label classes[i % len(classes)] and its own noise key derived from
(seed, i), so it comes out the same whatever the batch size or the process that draws it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from engine.noise import INITIAL_STREAM, gaussian_noise, image_keys
from engine.sampler import SamplerPlan, SampleSettings, step

if TYPE_CHECKING:
    from engine.graphs import StepGraphs

# What `interpolate` decodes with: deterministic DDIM (a pair's rows must differ only by x_T),
# purely conditional unless --guidance is given.
INTERPOLATION = SampleSettings(sampler="ddim", eta=0.0, guidance=0.0)


def guided_eps(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               guidance: float, null_class: int) -> torch.Tensor:
    """eps = (1 + w) eps(x, c) - w eps(x, null) (Ho & Salimans 2022, Eq. 6, the report's form).

    Conditional and unconditional halves go through the model as ONE batch of 2B. With
    w = 0 this is the purely conditional model, and the unconditional half is not computed.
    """
    if guidance == 0:
        return model(x, t, y)
    eps = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    eps_cond, eps_uncond = eps.chunk(2)
    return (1 + guidance) * eps_cond - guidance * eps_uncond


@dataclass
class Runner:
    """The reverse process over one batch: everything fixed for a run, built by engine.backends.build_runner."""

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

    def step(self, i: int | torch.Tensor, x: torch.Tensor, x0_prev: torch.Tensor, labels: torch.Tensor,
             keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_{t_i} -> x_{t_{i-1}}; returns it with this step's x0_hat (the next step's x0_prev).
        i: a Python int, or a (1,) device tensor (CUDA graphs: no host read)."""
        t = self.plan.timesteps[i].expand(len(x))
        eps = guided_eps(self.model, x, t, labels, self.guidance, self.null_class).float()
        return step(self.plan, i, x, eps, gaussian_noise(keys, i, self.shape), x0_prev, self.clip_x0)

    @torch.no_grad()
    def __call__(self, labels: torch.Tensor, keys: torch.Tensor, x_T: torch.Tensor | None = None,
                 on_step: Callable[[], object] | None = None) -> torch.Tensor:
        """x_0 (float32, nominally in [-1, 1]) of the images with these labels and noise keys, from
        x_T drawn from the keys unless given."""
        if self.graphs is not None:
            return self.graphs.run(self, labels, keys, x_T, on_step)
        x = gaussian_noise(keys, INITIAL_STREAM, self.shape) if x_T is None else x_T.float()
        x0 = torch.zeros_like(x)
        for i in reversed(range(self.plan.num_steps)):
            x, x0 = self.step(i, x, x0, labels, keys)
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
        return torch.no_grad()(lambda: self.step(i, x, x, labels, keys))


def default_batch_size(runner: Runner) -> int:
    """Images a sampling call: 256 on a GPU, 32 on the CPU (a U-Net batch of 64 under guidance), where
    both eager and ONNX Runtime have their lowest cost per image on our 2-core machine (the bundled
    model, idle machine, benchmarks/results/2026-11-29-cpu-sample.md: ms per image and U-Net call at
    U-Net batch 64 / 128 / 256: ONNX Runtime 4.6 / 4.9 / 5.7, eager 6.4 / 8.2 / 9.6)."""
    return 256 if runner.device.type != "cpu" else 32


def labels_for(indices: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return torch.tensor(classes, dtype=torch.int64)[indices % len(classes)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sample_batch(runner: Runner, indices: torch.Tensor, classes: list[int], seed: int,
                 on_step: Callable[[], object] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The images with these global indices, in one runner call: (uint8 B x H x W x 3, int64 labels)."""
    y = labels_for(indices, classes)
    x = runner(y.to(runner.device), image_keys(seed, indices).to(runner.device), on_step=on_step)
    if not torch.isfinite(x).all():  # one check a batch, after the loop: no sync inside it
        raise ValueError(f"the model produced NaN or infinite values (images {int(indices[0])}..{int(indices[-1])}): "
                         f"its weights or the sampling settings are broken")
    return to_uint8(x), y.numpy()


def generate(runner: Runner, indices: torch.Tensor, classes: list[int], seed: int, batch_size: int,
             progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sample the images with the given global indices, all in memory (for a few thousand at
    most: `ddpm-engine sample` streams through engine.images.SampleRun instead); returns
    (uint8 N x H x W x 3, int64 labels)."""
    batches = indices.split(batch_size)
    images, labels = [], []
    with tqdm(total=len(batches) * runner.plan.num_steps, desc="sampling", unit="step", disable=not progress) as bar:
        for batch in batches:
            x, y = sample_batch(runner, batch, classes, seed, on_step=bar.update)
            images.append(x)
            labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def slerp(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each pair of rows of a, b (flattened), for each lam."""
    a2, b2 = a.flatten(1).double(), b.flatten(1).double()
    theta = torch.arccos((a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1))).clamp(min=1e-6)[:, None, None]
    lam = lam.double()[None, :, None]
    out = (torch.sin((1 - lam) * theta) * a2[:, None] + torch.sin(lam * theta) * b2[:, None]) / torch.sin(theta)
    return out.to(a.dtype).reshape(len(a), len(lam[0]), *a.shape[1:])


def interpolate(runner: Runner, class_index: int, pairs: int, frames: int, seed: int,
                progress: bool = True) -> np.ndarray:
    """Interpolate between the initial noises of image pairs (2p, 2p + 1) of the run (report figures 4-5).

    Each pair gives two rows: linear interpolation of x_T (the report's), then spherical
    interpolation, which keeps x_T at the norm the model expects. Decoded by `runner` in one
    batch; use a deterministic sampler (INTERPOLATION: DDIM, eta = 0). Returns uint8
    (pairs * 2 * frames) x H x W x 3.
    """
    shape = runner.shape
    ends = gaussian_noise(image_keys(seed, torch.arange(2 * pairs)), INITIAL_STREAM, shape).reshape(pairs, 2, *shape)
    a, b = ends[:, 0], ends[:, 1]
    lam = torch.linspace(0, 1, frames)
    lerp = a[:, None] + lam.view(1, -1, 1, 1, 1) * (b - a)[:, None]
    x_T = torch.stack([lerp, slerp(a, b, lam)], dim=1).reshape(-1, *shape)  # pair, kind, frame
    y = torch.full((len(x_T),), class_index, dtype=torch.int64, device=runner.device)
    keys = torch.zeros(len(x_T), dtype=torch.int64, device=runner.device)  # unused: eta = 0 draws no noise
    with tqdm(total=runner.plan.num_steps, desc="interpolating", unit="step", disable=not progress) as bar:
        x = runner(y, keys, x_T=x_T.to(runner.device), on_step=bar.update)
    return to_uint8(x)
