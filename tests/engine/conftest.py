"""Fixtures of the engine's tests."""

import pytest
import torch

from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import save_checkpoint
from engine.model import UNet


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """The tiny preset with random weights as initialised, T = 50: quick CLI runs."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, UNet(PRESETS["tiny"]), DiffusionConfig(num_timesteps=50), CIFAR10_CLASSES)
    return path
