"""Offline clients of the sampling engine (engine.core): N images, interpolations, uint8 output.

Offline sampling is every request submitted at once and the engine run until idle; the loop
itself, and the batching, are the engine's. Image i of a run has label classes[i % len(classes)]
and its own noise key derived from (seed, i), so it comes out the same whatever the batch size,
the process that draws it, or the other images that share its batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from engine.core import Engine, Request
from engine.noise import INITIAL_STREAM, gaussian_noise, image_keys
from engine.settings import SampleSettings

# What `interpolate` decodes with: deterministic DDIM (a pair's rows must differ only by x_T),
# purely conditional unless --guidance is given.
INTERPOLATION = SampleSettings(sampler="ddim", eta=0.0, guidance=0.0)


def labels_for(indices: torch.Tensor, classes: list[int]) -> torch.Tensor:
    return torch.tensor(classes, dtype=torch.int64)[indices % len(classes)]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_progress(total_images: int, progress: bool, desc: str = "sampling") -> tqdm:
    """A bar in images (fractions as their steps are taken), so its rate is images/s."""
    return tqdm(total=total_images, desc=desc, unit="img", disable=not progress,
                bar_format="{l_bar}{bar}| {n:.1f}/{total} [{elapsed}<{remaining}, {rate_fmt}]")


def advance_bar(bar: tqdm) -> Callable[[Request, int], None]:
    """A Request.on_progress that moves `bar` by the images' fraction of their steps just taken (kept
    within its total: fractions summed in floating point may pass it, which tqdm warns about)."""
    return lambda request, image_steps: bar.update(min(image_steps / request.num_steps, bar.total - bar.n))


def sample_tensor(engine: Engine, settings: SampleSettings, labels: torch.Tensor, keys: torch.Tensor,
                  x_T: torch.Tensor | None = None,
                  on_progress: Callable[[Request, int], object] | None = None) -> torch.Tensor:
    """x_0 (float32 on the engine's device, nominally in [-1, 1]) of the rows with these labels and
    noise keys, from x_T drawn from the keys unless given: one request, the engine run until idle."""
    request = engine.submit(Request(settings, labels.cpu(), keys.cpu(), x_T, on_progress=on_progress))
    engine.run()
    return request.wait()


def generate(engine: Engine, settings: SampleSettings, indices: torch.Tensor, classes: list[int], seed: int,
             progress: bool = True, bar: tqdm | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sample the images with these global indices, all in memory (a shard of `ddpm-engine sample`,
    or a few thousand images at most); returns (uint8 N x H x W x 3, int64 labels). `bar`: a shared
    progress bar in images (image_progress) instead of one of its own."""
    labels = labels_for(indices, classes)
    own_bar = bar is None
    bar = image_progress(len(indices), progress) if own_bar else bar
    try:
        x = sample_tensor(engine, settings, labels, image_keys(seed, indices), on_progress=advance_bar(bar))
        return to_uint8(x), labels.numpy()
    finally:
        if own_bar:
            bar.close()


def slerp(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of each pair of rows of a, b (flattened), for each lam."""
    a2, b2 = a.flatten(1).double(), b.flatten(1).double()
    theta = torch.arccos((a2 * b2).sum(1) / (a2.norm(dim=1) * b2.norm(dim=1))).clamp(min=1e-6)[:, None, None]
    lam = lam.double()[None, :, None]
    out = (torch.sin((1 - lam) * theta) * a2[:, None] + torch.sin(lam * theta) * b2[:, None]) / torch.sin(theta)
    return out.to(a.dtype).reshape(len(a), len(lam[0]), *a.shape[1:])


def interpolate(engine: Engine, settings: SampleSettings, class_index: int, pairs: int, frames: int, seed: int,
                progress: bool = True) -> np.ndarray:
    """Interpolate between the initial noises of image pairs (2p, 2p + 1) of the run (report figures 4-5).

    Each pair gives two rows: linear interpolation of x_T (the report's), then spherical
    interpolation, which keeps x_T at the norm the model expects. Decode with a deterministic
    sampler (INTERPOLATION: DDIM, eta = 0). Returns uint8 (pairs * 2 * frames) x H x W x 3.
    """
    shape = engine.shape
    ends = gaussian_noise(image_keys(seed, torch.arange(2 * pairs)), INITIAL_STREAM, shape).reshape(pairs, 2, *shape)
    a, b = ends[:, 0], ends[:, 1]
    lam = torch.linspace(0, 1, frames)
    lerp = a[:, None] + lam.view(1, -1, 1, 1, 1) * (b - a)[:, None]
    x_T = torch.stack([lerp, slerp(a, b, lam)], dim=1).reshape(-1, *shape)  # pair, kind, frame
    labels = torch.full((len(x_T),), class_index, dtype=torch.int64)
    keys = torch.zeros(len(x_T), dtype=torch.int64)  # unused: eta = 0 draws no noise
    with image_progress(len(x_T), progress, "interpolating") as bar:
        return to_uint8(sample_tensor(engine, settings, labels, keys, x_T, on_progress=advance_bar(bar)))
