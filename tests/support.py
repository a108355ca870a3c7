"""Helpers the whole test tree shares: a random U-Net whose images stay off the clipping rails, an
engine around any eps model, and the comparison of images made at other batch sizes. (Fixtures are in
tests/conftest.py: `make_checkpoint`, the one factory of test checkpoints.)"""

from __future__ import annotations

import numpy as np
import torch

from engine.config import ModelConfig
from engine.core import Engine
from engine.model import UNet


def random_unet(config: ModelConfig, seed: int = 0, quiet: bool = True) -> UNet:
    """UNet(config) with the random weights of `seed`, in eval mode. quiet: its output layer scaled by 0.1,
    since random weights predict an eps so large that x_0 saturates almost every pixel and an image
    comparison would test nothing; scaled, about half of them stay in range."""
    torch.manual_seed(seed)
    model = UNet(config).eval()
    if quiet:
        with torch.no_grad():
            model.conv_out.weight.mul_(0.1)
            model.conv_out.bias.mul_(0.1)
    return model


def engine_of(model, diffusion, shape: tuple[int, int, int], null_class: int, device: str = "cpu",
              max_batch: int = 8, **options) -> Engine:
    """An Engine over `model` as build_engine would make one, with the test's shapes and options
    (graphs, capture, admission, name)."""
    name = options.pop("name", "test")
    return Engine(name, model, diffusion, shape, null_class, device, max_batch, **options)


def same_images(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: the noise is bit-identical, but the CPU convolution may pick
    another algorithm for another batch size, and a last-bit difference can flip a rounding
    to uint8 by one level."""
    diff = np.abs(a.astype(int) - b)
    return diff.max() <= 1 and (diff > 0).mean() < 1e-3
