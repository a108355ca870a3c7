"""Fixtures shared across the test tree: `make_checkpoint`, the one factory of test checkpoints, and the
checkpoints most tests use, made with it."""

import pytest

from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.formats.checkpoint import save_checkpoint
from tests.support import random_unet


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """make_checkpoint(preset="tiny", diffusion=DiffusionConfig(), class_names=CIFAR10_CLASSES, quiet=True,
    seed=0) -> the path of a .safetensors checkpoint of random weights (tests.support.random_unet), made
    once per session for each distinct set of arguments."""
    made = {}

    def make(preset="tiny", diffusion=DiffusionConfig(), class_names=CIFAR10_CLASSES, quiet=True, seed=0):
        key = (preset, diffusion, tuple(class_names), quiet, seed)
        if key not in made:
            path = tmp_path_factory.mktemp("ckpt") / f"{preset}.safetensors"
            save_checkpoint(path, random_unet(PRESETS[preset], seed, quiet), diffusion, tuple(class_names))
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint):
    """The tiny preset with random weights (output layer quieted), T = 100, CIFAR-10's class names."""
    return make_checkpoint(diffusion=DiffusionConfig(num_timesteps=100, beta_end=0.01))
