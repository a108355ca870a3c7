"""A `tiny` checkpoint with random weights, exported once per session in each precision."""

import pytest
import torch

from engine.checkpoint import load_checkpoint, save_checkpoint
from engine.config import CIFAR10_CLASSES, PRESETS, DiffusionConfig
from engine.model import UNet
from engine.runtimes.onnx_export import export_onnx
from export.cli import main as export_main


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    # Random weights predict an eps so large that x_0 saturates almost every pixel, and an
    # image comparison would test nothing; a smaller output layer keeps half of them in range.
    with torch.no_grad():
        model.conv_out.weight.mul_(0.1)
        model.conv_out.bias.mul_(0.1)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, model, DiffusionConfig(num_timesteps=100, beta_end=0.01), CIFAR10_CLASSES)
    return path


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def onnx_fp32(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny, path, fp16=False)
    return path


@pytest.fixture(scope="session")
def onnx_fp16(tiny_checkpoint, tmp_path_factory):
    """Made through the command line, so its success path is exercised too."""
    path = tmp_path_factory.mktemp("onnx") / "tiny-fp16.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--fp16", "--out", str(path)]) == 0
    return path
