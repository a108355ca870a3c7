"""What a run samples from its EMA model as it trains: the grids in samples/ and the FID in log.csv."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from engine.backends import build_engine
from engine.config import DiffusionConfig, ModelConfig
from engine.core import Engine
from engine.evaluation import fid
from engine.formats.checkpoint import Checkpoint, atomic_write
from engine.formats.images import class_rows, grid
from engine.generate import generate
from engine.model import UNet
from engine.settings import SampleSettings
from training.config import TrainConfig

SAMPLES_PER_CLASS = 4
GRID_BUDGET = 0.1  # the end-of-run grid is skipped when it would cost more than this share of the run
FID_CHUNK = 256  # images sampled, then featurised, at a time in an FID evaluation (bounded memory)


def training_sampler(ema: UNet, diffusion: DiffusionConfig, config: TrainConfig,
                     device: torch.device) -> tuple[Engine, SampleSettings]:
    """What the grids and the FID evaluations sample with: the eager EMA model, --sample-sampler for
    --sample-steps and the sampler's default guidance, without dynamic thresholding (the protocol of
    the FID curves in log.csv since their start)."""
    settings = SampleSettings(sampler=config.sample_sampler, steps=min(config.sample_steps, diffusion.num_timesteps),
                              threshold=0.0)
    return build_engine(Checkpoint(ema, diffusion, ()), "eager", device, "fp32"), settings


@torch.no_grad()
def evaluate_fid(ema: UNet, mc: ModelConfig, diffusion: DiffusionConfig, config: TrainConfig, device: torch.device,
                 network: fid.InceptionNetwork, reference: fid.Stats) -> float:
    """FID of config.fid_samples images of the EMA model (the grids' sampler, steps and guidance,
    class i % num_classes for image i, the run's seed) against the reference statistics."""
    classes = list(range(mc.num_classes))
    engine, settings = training_sampler(ema, diffusion, config, device)

    def batches():
        for indices in torch.arange(config.fid_samples).split(FID_CHUNK):
            images, _ = generate(engine, settings, indices, classes, seed=config.seed, progress=False)
            yield images

    stats = fid.feature_stats(network, batches(), config.fid_samples, progress=False, source="training samples")
    return fid.frechet_distance(stats, reference)


def grid_is_cheap(steps_trained: int, config: TrainConfig, mc: ModelConfig) -> bool:
    """Whether a sample grid costs at most GRID_BUDGET of `steps_trained` training steps, counting
    U-Net forwards: 2 per grid image and sampling step (guidance), about 3 per training image."""
    grid_forwards = 2 * SAMPLES_PER_CLASS * mc.num_classes * config.sample_steps
    return grid_forwards <= GRID_BUDGET * 3 * steps_trained * config.batch_size


@torch.no_grad()
def save_samples(path: Path, ema: UNet, mc: ModelConfig, diffusion: DiffusionConfig, config: TrainConfig,
                 device: torch.device) -> None:
    """A grid of SAMPLES_PER_CLASS images of each class (one row a class), seed 0, written atomically."""
    classes = list(range(mc.num_classes))
    engine, settings = training_sampler(ema, diffusion, config, device)
    images, labels = generate(engine, settings, torch.arange(SAMPLES_PER_CLASS * len(classes)), classes, seed=0,
                              progress=False)
    picture = Image.fromarray(grid(class_rows(images, labels, classes)))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
