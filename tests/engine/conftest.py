"""Fixtures of the engine's tests."""

import pytest

from engine.config import DiffusionConfig


@pytest.fixture(scope="session")
def checkpoint(make_checkpoint):
    """The tiny preset with random weights as initialised, T = 50: quick CLI runs."""
    return make_checkpoint(diffusion=DiffusionConfig(num_timesteps=50), quiet=False)
