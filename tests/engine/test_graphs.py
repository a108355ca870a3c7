"""The CUDA-graph path of the Runner: same maths as its plain loop, no host sync in a step.

On the CPU the bucketed step without capture (StepGraphs(capture=False)) is compared with
the Runner's plain loop, and the step is checked to never read a device value on the host
(which would break capture). The capture itself, graphed == not graphed and the 50-step
DDIM comparison run on a GPU (marked `gpu`).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import PRESETS, DiffusionConfig, ModelConfig
from engine.generate import Runner
from engine.graphs import StepGraphs, default_buckets
from engine.model import UNet
from engine.noise import image_keys
from engine.sampler import ddim_plan, ddpm_plan

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


def batch(n, device="cpu"):
    indices = torch.arange(n)
    return (indices % CONFIG.num_classes).to(device), image_keys(5, indices).to(device)


def runner(model, plan, guidance, graphs=None, shape=SHAPE, clip_x0=False):
    return Runner("test", model, plan, shape, 10, guidance, clip_x0, graphs)


def test_default_buckets():
    assert default_buckets(1) == (1,)
    assert default_buckets(256) == (1, 2, 4, 8, 16, 32, 64, 128, 256)
    assert default_buckets(100) == (1, 2, 4, 8, 16, 32, 64, 100)


@pytest.mark.parametrize("plan", [ddpm_plan(DIFFUSION, 4), ddim_plan(DIFFUSION, 3, eta=0.5)], ids=["ddpm", "ddim"])
def test_bucketed_steps_equal_the_plain_loop_exactly(model, plan):
    labels, keys = batch(4)
    ref = runner(model, plan, 1.5, clip_x0=True)(labels, keys)
    out = runner(model, plan, 1.5, StepGraphs((4,), capture=False), clip_x0=True)(labels, keys)
    assert torch.equal(out, ref)


def test_padding_and_splitting_keep_each_image(model):
    plan = ddpm_plan(DIFFUSION, 3)
    labels, keys = batch(5)
    ref = runner(model, plan, 1.0)(labels, keys)
    steps = []
    padded = runner(model, plan, 1.0, StepGraphs((8,), capture=False))(labels, keys, on_step=lambda: steps.append(1))
    split = runner(model, plan, 1.0, StepGraphs((1, 2), capture=False))(labels, keys)
    assert len(steps) == plan.num_steps
    # Other batch sizes: the convolutions may sum in another order (last bits only).
    torch.testing.assert_close(padded, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(split, ref, rtol=0, atol=1e-5)


def test_given_x_T_is_used(model):
    plan = ddim_plan(DIFFUSION, 2)
    labels, keys = batch(2)
    x_T = torch.randn(2, *SHAPE)
    ref = runner(model, plan, 0.0)(labels, keys, x_T=x_T)
    out = runner(model, plan, 0.0, StepGraphs((2,), capture=False))(labels, keys, x_T=x_T)
    assert torch.equal(out, ref)
    assert not torch.equal(out, runner(model, plan, 0.0)(labels, keys))


def test_graphs_serve_one_runner(model):
    graphs = StepGraphs((2,), capture=False)
    labels, keys = batch(2)
    runner(model, ddim_plan(DIFFUSION, 2), 0.0, graphs)(labels, keys)
    with pytest.raises(ValueError, match="one Runner"):
        runner(model, ddim_plan(DIFFUSION, 3), 0.0, graphs)(labels, keys)


class HostReads(TorchDispatchMode):
    """Records ops that copy a device value to the host (.item(), bool(tensor), ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("guidance", [0.0, 1.8])
def test_a_step_reads_nothing_from_the_device(model, guidance):
    """What capture needs: the step index stays on the device (a 0-d index would call .item())."""
    plan = ddpm_plan(DIFFUSION, 5)
    graphs = StepGraphs((2,), capture=False)
    labels, keys = batch(2)
    advance, _ = graphs.prepare(runner(model, plan, guidance, graphs, clip_x0=True), labels, keys)
    with HostReads() as mode:
        advance()
        advance()
    assert mode.reads == []
    assert graphs._state[2].index.tolist() == [plan.num_steps - 3]
    with HostReads() as mode:  # the detector itself: a host read is seen
        graphs._state[2].index.item()
    assert mode.reads != []


@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_graphed_equals_not_graphed_exactly(sampler):
    from engine.fused import fuse

    torch.manual_seed(0)
    fused = fuse(UNet(PRESETS["cifar10-compact"]).eval().cuda(), "bf16")
    plan = (ddpm_plan(DIFFUSION, 20) if sampler == "ddpm" else ddim_plan(DIFFUSION, 20, eta=0.3)).to("cuda")
    labels, keys = batch(6, "cuda")
    eager = runner(fused, plan, 1.8, StepGraphs((8,), capture=False), SHAPE32)(labels, keys)
    graphs = StepGraphs((8,), capture=True)
    graphed_runner = runner(fused, plan, 1.8, graphs, SHAPE32)
    graphed = graphed_runner(labels, keys)
    assert graphs._state[8].graph is not None
    assert torch.equal(graphed, eager)
    again = graphed_runner(labels, keys)  # replays the captured graph
    assert torch.equal(again, eager)


@pytest.mark.gpu
def test_no_host_sync_while_sampling():
    """After capture, a whole run (S replays and the host loop around them) never syncs: with sync
    debug mode "error" any sync raises. The mode is checked to be on by a deliberate sync."""
    from engine.fused import fuse

    torch.manual_seed(0)
    fused = fuse(UNet(PRESETS["tiny"]).eval().cuda(), "bf16")
    plan = ddpm_plan(DIFFUSION).to("cuda")
    labels, keys = batch(4, "cuda")
    graphed_runner = runner(fused, plan, 1.8, StepGraphs((4,)), SHAPE32)
    reference = graphed_runner(labels, keys)  # captures the graph (capture itself synchronises)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = graphed_runner(labels, keys)
        with pytest.raises(RuntimeError):
            out.sum().item()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(out, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["cifar10-compact", "ddpm-cifar10"])
def test_fused_ddim50_images_match_eager_fp32(preset):
    """Final images of a 50-step DDIM run: within a few intensity levels of the eager fp32 model."""
    from engine.fused import fuse
    from engine.generate import to_uint8

    torch.manual_seed(0)
    model = UNet(PRESETS[preset]).eval().cuda()
    with torch.no_grad():  # keep random-weight images off the clipping rails, as tests/export does
        model.conv_out.weight.mul_(0.1)
        model.conv_out.bias.mul_(0.1)
    plan = ddim_plan(DiffusionConfig(), 50).to("cuda")
    labels, keys = batch(16, "cuda")
    ref = to_uint8(runner(model, plan, 1.8, shape=SHAPE32)(labels, keys)).astype(int)
    out = to_uint8(runner(fuse(model, "bf16"), plan, 1.8, StepGraphs((16,)), SHAPE32)(labels, keys)).astype(int)
    diff = abs(out - ref)
    assert diff.mean() <= 1.0 and (diff <= 4).mean() >= 0.99, (diff.mean(), diff.max())
