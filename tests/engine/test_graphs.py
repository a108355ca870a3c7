"""The CUDA-graph path of the engine: the same maths as its plain step, no host sync in a step.

On the CPU the padded buckets without capture (Engine(graphs=True, capture=False)) are compared
with the plain step, and an engine step is checked to never read a device value on the host
(which would break capture). The capture itself, graphed == not graphed and the 50-step DDIM
comparison run on a GPU (marked `gpu`).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import PRESETS, DiffusionConfig, ModelConfig
from engine.core import Request
from engine.generate import sample_tensor, to_uint8
from engine.graphs import StepGraphs, default_buckets
from engine.model import UNet
from engine.noise import image_keys
from engine.settings import SampleSettings
from tests import support
from tests.support import random_unet

# Small enough for eager CPU runs of a few steps; the GPU tests use the real presets.
CONFIG = ModelConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                     dropout=0.0)
SHAPE = (3, 16, 16)
SHAPE32 = (3, 32, 32)
DIFFUSION = DiffusionConfig(num_timesteps=100, beta_end=0.01)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UNet(CONFIG).eval()


def batch(n):
    indices = torch.arange(n)
    return indices % CONFIG.num_classes, image_keys(5, indices)


def engine_of(model, shape=SHAPE, device="cpu", max_batch=8, graphs=False, capture=True, diffusion=DIFFUSION):
    return support.engine_of(model, diffusion, shape, 10, device, max_batch, graphs=graphs, capture=capture)


def test_default_buckets():
    assert default_buckets(1) == (1,)
    assert default_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert default_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)


def test_step_graphs_pad_to_the_bucket_and_return_the_rows():
    seen = []

    def fn(x, y):
        seen.append(len(x))
        return x * 2, y + 1

    graphs = StepGraphs(fn, (2, 8), capture=False)
    x, y = graphs(torch.ones(3, 4), torch.arange(3))
    assert seen == [8] and torch.equal(x, torch.full((3, 4), 2.0)) and y.tolist() == [1, 2, 3]
    graphs(torch.ones(1, 4), torch.arange(1))
    assert seen == [8, 2]
    with pytest.raises(ValueError, match="largest bucket"):
        graphs(torch.ones(9, 4), torch.arange(9))


@pytest.mark.parametrize("settings", [
    SampleSettings(sampler="ddpm", steps=4, guidance=1.5, clip_x0=True),
    SampleSettings(sampler="ddim", steps=3, eta=0.5, guidance=1.5),
    SampleSettings(sampler="dpm++2m", steps=4, guidance=0.0),
    SampleSettings(sampler="ddim", steps=4, guidance=2.0, guidance_interval=(0.5, 5.0)),
], ids=["ddpm-clip", "ddim", "dpm-unguided", "ddim-guidance-interval"])
def test_bucketed_steps_equal_the_plain_step(model, settings):
    """5 rows padded to the bucket of 8, every row computing its unconditional half (w = 0 rows
    weigh it by 0): the plain step's images, up to the convolutions' summation order."""
    labels, keys = batch(5)
    ref = sample_tensor(engine_of(model), settings, labels, keys)
    out = sample_tensor(engine_of(model, graphs=True, capture=False), settings, labels, keys)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


class HostReads(TorchDispatchMode):
    """Records ops that copy a device value to the host (.item(), bool(tensor), ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("graphs", [False, True], ids=["plain", "buckets"])
def test_an_engine_step_reads_nothing_from_the_device(model, graphs):
    """What capture needs: between rows joining and leaving, a step (model call, guidance of mixed w,
    per-row coefficients, noise and clipping of mixed settings) reads no device value."""
    engine = engine_of(model, graphs=graphs, capture=False)
    labels, keys = batch(4)
    engine.submit(Request(SampleSettings(sampler="ddpm", steps=5, guidance=1.8, clip_x0=True), labels[:2], keys[:2]))
    engine.submit(Request(SampleSettings(sampler="dpm++2m", steps=6, guidance=0.0), labels[2:], keys[2:]))
    engine.step()  # the rows join here
    with HostReads() as mode:
        engine.step()
        engine.step()
    assert mode.reads == []
    with HostReads() as mode:  # the detector itself: a host read is seen
        torch.arange(3)[1].item()
    assert mode.reads != []


def fused_engine(preset, graphs, capture=True, max_batch=8):
    from engine.fused import fuse

    torch.manual_seed(0)
    fused = fuse(UNet(PRESETS[preset]).eval().cuda(), "bf16")
    return engine_of(fused, SHAPE32, "cuda", max_batch, graphs, capture, DiffusionConfig())


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m"])
def test_graphed_equals_not_graphed_exactly(sampler):
    settings = SampleSettings(sampler=sampler, steps=20, eta=0.3, guidance=1.8)
    labels, keys = batch(6)
    eager = sample_tensor(fused_engine("cifar10-compact", True, capture=False), settings, labels, keys)
    graphed_engine = fused_engine("cifar10-compact", True)
    graphed = sample_tensor(graphed_engine, settings, labels, keys)
    assert graphed_engine.graphs._buckets[8].graph is not None
    assert torch.equal(graphed, eager)
    assert torch.equal(sample_tensor(graphed_engine, settings, labels, keys), eager)  # replays the captured graph


@pytest.mark.gpu
def test_no_host_sync_while_stepping():
    """After capture, engine steps between rows joining and leaving never sync: with sync debug mode
    "error" any sync raises. The mode is checked to be on by a deliberate sync."""
    engine = fused_engine("tiny", True, max_batch=4)
    labels, keys = batch(4)
    settings = SampleSettings(sampler="ddpm", steps=50, guidance=1.8)
    sample_tensor(engine, settings, labels, keys)  # captures the graph (capture itself synchronises)
    engine.submit(Request(settings, labels, keys))
    engine.step()  # the rows join
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            engine.step()
        with pytest.raises(RuntimeError):  # the mode is on: a deliberate sync raises
            torch.ones(2, device="cuda").sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.run()


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar10-compact", "ddpm-cifar10"])
def test_fused_ddim50_images_match_eager_fp32(preset):
    """Final images of a 50-step DDIM run: within a few intensity levels of the eager fp32 model."""
    from engine.fused import fuse

    model = random_unet(PRESETS[preset]).cuda()
    settings = SampleSettings(sampler="ddim", steps=50, guidance=1.8)
    labels, keys = batch(16)
    reference = engine_of(model, SHAPE32, "cuda", 16, diffusion=DiffusionConfig())
    ref = to_uint8(sample_tensor(reference, settings, labels, keys)).astype(int)
    fused = engine_of(fuse(model, "bf16"), SHAPE32, "cuda", 16, graphs=True, diffusion=DiffusionConfig())
    out = to_uint8(sample_tensor(fused, settings, labels, keys)).astype(int)
    diff = abs(out - ref)
    assert diff.mean() <= 1.0 and (diff <= 4).mean() >= 0.99, (diff.mean(), diff.max())
