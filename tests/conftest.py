"""Fixtures shared across the test tree."""

import pytest
import torch

from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import save_checkpoint
from engine.model import UNet


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny preset with random weights, T = 100, CIFAR-10's class names. Random weights predict an eps
    so large that x_0 saturates almost every pixel, and an image comparison would test nothing; a
    smaller output layer keeps half of them in range."""
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    with torch.no_grad():
        model.conv_out.weight.mul_(0.1)
        model.conv_out.bias.mul_(0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, DiffusionConfig(num_timesteps=100, beta_end=0.01), CIFAR10_CLASSES)
    return path
