"""Multi-process sampling: 2 CPU processes under torchrun (gloo) write exactly the
single-process images, in one output."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.apps.cli import main
from engine.config import CIFAR10_CLASSES, DiffusionConfig, ModelConfig
from engine.formats.checkpoint import save_checkpoint
from engine.model import UNet

SMALL = ModelConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                    dropout=0.0)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo multi-process test runs on Linux/macOS")
def test_two_processes_write_the_single_process_images(tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "small.safetensors"
    save_checkpoint(checkpoint, UNet(SMALL), DiffusionConfig(num_timesteps=20), CIFAR10_CLASSES)
    args = ["sample", "--checkpoint", str(checkpoint), "-n", "7", "--sampler", "ddpm", "--steps", "3",
            "--batch-size", "2", "--seed", "11", "--backend", "eager", "--device", "cpu", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "engine.apps.cli", *args, "--out", str(tmp_path / "multi")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("wrote 7 images") == 1 and "2 processes" in result.stdout  # rank 0 alone writes
    single, multi = np.load(tmp_path / "single" / "samples.npz"), np.load(tmp_path / "multi" / "samples.npz")
    assert np.array_equal(multi["y"], single["y"])
    assert np.array_equal(multi["x"], single["x"])
    assert sorted(os.listdir(tmp_path / "multi" / "images")) == [f"{i:06d}.png" for i in range(7)]
