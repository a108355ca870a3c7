from dataclasses import replace

import numpy as np
import pytest
import torch

from engine.backends import build_engine
from engine.config import PRESETS, DiffusionConfig
from engine.formats.checkpoint import Checkpoint
from engine.generate import INTERPOLATION, generate, interpolate, labels_for, slerp
from engine.model import UNet
from engine.settings import SampleSettings
from tests.support import same_images

CONFIG = PRESETS["tiny"]
DIFFUSION = DiffusionConfig(num_timesteps=100)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(CONFIG).eval()


def run(model, indices, batch_size, settings=SampleSettings(sampler="ddim", steps=4, guidance=1.5), seed=5):
    engine = build_engine(Checkpoint(model, DIFFUSION, ()), "eager", max_batch=batch_size)
    return generate(engine, settings, torch.as_tensor(indices), [0, 3, 7], seed, progress=False)


def test_image_i_does_not_depend_on_batch_size_or_run_size(model):
    images, labels = run(model, range(7), batch_size=7)
    for batch_size in (1, 3):
        again, labels_again = run(model, range(7), batch_size)
        assert same_images(again, images) and np.array_equal(labels_again, labels)
    subset, _ = run(model, [5, 2], batch_size=2)
    assert same_images(subset, images[[5, 2]])


def test_labels_cycle_over_the_classes_and_outputs_are_uint8(model):
    images, labels = run(model, range(5), batch_size=5)
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)
    assert labels.tolist() == [0, 3, 7, 0, 3]
    assert labels_for(torch.tensor([10]), [4, 5]).tolist() == [4]


def test_seed_changes_the_images(model):
    a, _ = run(model, range(2), 2, seed=1)
    b, _ = run(model, range(2), 2, seed=2)
    assert not np.array_equal(a, b)


def test_ddpm_sampler_with_noise_is_also_batch_invariant(model):
    settings = SampleSettings(sampler="ddpm", steps=5, guidance=0.0)
    a, _ = run(model, range(4), 4, settings)
    b, _ = run(model, range(4), 1, settings)
    assert same_images(a, b)


def test_slerp_keeps_the_norm_and_hits_the_ends():
    torch.manual_seed(0)
    a, b = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)  # equal norms
    lam = torch.linspace(0, 1, 5)
    out = slerp(a, b, lam)
    assert out.shape == (3, 5, 3, 8, 8)
    assert torch.allclose(out[:, 0], a, atol=1e-5) and torch.allclose(out[:, -1], b, atol=1e-5)
    norms = out.flatten(2).norm(dim=2)
    # Along the great circle the norm stays put; the lerp midpoint of two nearly orthogonal
    # Gaussian vectors shrinks it by about 1/sqrt(2).
    assert torch.allclose(norms, norms[:, :1], rtol=1e-4)
    mid_lerp = ((a + b) / 2).flatten(1).norm(dim=1)
    assert (mid_lerp < 0.8 * norms[:, 2]).all()


def test_interpolation_rows_start_and_end_at_the_same_images(model):
    engine = build_engine(Checkpoint(model, DIFFUSION, ()), "eager")
    images = interpolate(engine, replace(INTERPOLATION, steps=3), class_index=2, pairs=2, frames=4, seed=0,
                         progress=False)
    assert images.shape == (2 * 2 * 4, 32, 32, 3)
    rows = images.reshape(2, 2, 4, 32, 32, 3)  # pair, (lerp, slerp), frame
    for pair in range(2):
        lerp, sl = rows[pair]
        assert np.abs(lerp[0].astype(int) - sl[0]).max() <= 1 and np.abs(lerp[-1].astype(int) - sl[-1]).max() <= 1
        assert not np.array_equal(lerp[1:-1], sl[1:-1])


def test_the_progress_bar_never_passes_its_total():
    """100 images of 15 steps in batches of 32 (`ddpm-engine sample`'s default): the fractions 32/15 and
    4/15 sum past 100.0 in floating point; the bar stays within its total, so tqdm neither warns
    ("clamping frac") nor shows a negative time left."""
    import warnings

    from tqdm import TqdmWarning

    from engine.generate import advance_bar, image_progress

    class Fifteen:
        num_steps = 15

    with warnings.catch_warnings():
        warnings.simplefilter("error", TqdmWarning)
        with image_progress(100, progress=True) as bar:
            advance = advance_bar(bar)
            for rows in [32] * 45 + [4] * 15:
                advance(Fifteen, rows)
                assert bar.n <= bar.total
            assert bar.n == pytest.approx(100)
