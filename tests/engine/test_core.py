"""The sampling engine: an image does not depend on what shares its batch; admission is fair;
cancelled rows leave at the next step; failures end only the requests they touch."""

import pytest
import torch

from engine.config import DiffusionConfig, ModelConfig
from engine.core import Engine, EngineClosed, NonFiniteImages, Request
from engine.formats.checkpoint import Checkpoint
from engine.model import UNet
from engine.noise import INITIAL_STREAM, gaussian_noise, image_keys
from engine.sampler import step
from engine.settings import SampleSettings

CONFIG = ModelConfig(image_size=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                     dropout=0.0)
SHAPE = (3, 16, 16)
DIFFUSION = DiffusionConfig(num_timesteps=100)
NULL = CONFIG.null_class

THE_REQUEST = SampleSettings(sampler="dpm++2m", steps=6, guidance=1.8, threshold=0.0)
OTHERS = [  # different samplers, step counts, guidance (0 too), clipping, dynamic thresholding, classes
    SampleSettings(sampler="ddpm", steps=9, guidance=3.0, clip_x0=True),
    SampleSettings(sampler="ddim", steps=4, eta=0.5, guidance=0.0),
    SampleSettings(sampler="dpm++2m", steps=10, guidance=0.6, spacing="trailing", threshold=0.9),
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    unet = UNet(CONFIG).eval()
    with torch.no_grad():  # keep random-weight images off the clipping rails
        unet.conv_out.weight.mul_(0.1)
    return unet


def engine_of(model, max_batch=8, admission="step", name="eager"):
    return Engine(name, model, DIFFUSION, SHAPE, NULL, "cpu", max_batch, admission=admission)


def request(settings, indices, seed=3, classes=(1, 4, 7)):
    indices = torch.as_tensor(indices)
    labels = torch.tensor(classes)[indices % len(classes)]
    return Request(settings, labels, image_keys(seed, indices))


@torch.no_grad()
def reference(model, settings, labels, keys):
    """Today's `ddpm-engine sample` loop, written out: one batch from x_T to x_0, guidance from two
    separate model calls, the plan's step i with the images' noise of stream i."""
    plan = settings.plan(DIFFUSION)
    x = gaussian_noise(keys, INITIAL_STREAM, SHAPE)
    x0 = torch.zeros_like(x)
    w = settings.guidance
    for i in reversed(range(plan.num_steps)):
        t = plan.timesteps[i].expand(len(x))
        eps = model(x, t, labels)
        if w:
            eps = (1 + w) * eps - w * model(x, t, torch.full_like(labels, NULL))
        x, x0 = step(plan, i, x, eps, gaussian_noise(keys, i, SHAPE), x0, settings.clip_x0, settings.threshold)
    return x


def mixed_run(model_or_engine, stagger: bool):
    """THE_REQUEST (images 0..4) with the OTHERS around it; stagger: the others join while it runs."""
    engine = model_or_engine if isinstance(model_or_engine, Engine) else engine_of(model_or_engine)
    others = [request(s, range(10 * k, 10 * k + 3), seed=k) for k, s in enumerate(OTHERS, 1)]
    engine.submit(others[0])
    if stagger:
        engine.step()
        engine.step()
    mine = engine.submit(request(THE_REQUEST, range(5)))
    if stagger:
        engine.step()
    for other in others[1:]:
        engine.submit(other)
    engine.run()
    return mine.wait(), others


def test_an_image_is_the_same_alone_and_mixed_with_other_requests(model):
    alone = engine_of(model)
    mine = alone.submit(request(THE_REQUEST, range(5)))
    alone.run()
    want = reference(model, THE_REQUEST, mine.labels, mine.keys)
    assert (mine.wait() - want).abs().max() <= 1e-4
    for stagger in (False, True):
        got, others = mixed_run(model, stagger)
        assert (got - want).abs().max() <= 1e-4, stagger
        for other in others:  # and every other request is its own reference
            assert (other.wait() - reference(model, other.settings, other.labels, other.keys)).abs().max() <= 1e-4
    assert want.std() > 0.1  # not a comparison of constant images


def test_mixed_batches_through_onnx_runtime(model, tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.formats.onnx import load_onnx
    from engine.formats.onnx_export import export_onnx

    export_onnx(Checkpoint(model, DIFFUSION, tuple(f"c{k}" for k in range(10))), tmp_path / "m.onnx")
    onnx_model = load_onnx(tmp_path / "m.onnx").model
    alone = request(THE_REQUEST, range(5))
    want = reference(model, THE_REQUEST, alone.labels, alone.keys)
    got, _ = mixed_run(engine_of(onnx_model, name="onnx"), stagger=True)
    assert (got - want).abs().max() <= 1e-4


class CallSizes(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x, t, y):
        self.sizes.append(len(x))
        return self.model(x, t, y)


def test_one_model_call_a_step_with_the_unconditional_rows_of_the_guided_only(model):
    counted = CallSizes(model)
    engine = engine_of(counted)
    engine.submit(request(SampleSettings(sampler="ddim", steps=2, guidance=1.0), range(3)))
    engine.submit(request(SampleSettings(sampler="ddim", steps=2, guidance=0.0), range(2)))
    engine.run()
    assert counted.sizes == [5 + 3, 5 + 3]


def test_a_small_request_does_not_wait_for_a_big_one(model):
    """Arriving while a 40-image request fills the batch, a 1-image request of S steps finishes within
    2S + 2 engine steps; with whole-request batching it waits for the big one."""
    settings = SampleSettings(sampler="ddim", steps=3, guidance=0.0)
    for admission, bound in (("step", 2 * 3 + 2), ("request", None)):
        engine = engine_of(CallSizes(model), max_batch=8, admission=admission)
        big = engine.submit(request(settings, range(40)))
        engine.step()
        engine.step()
        small = engine.submit(request(settings, [100]))
        arrival = engine.steps_run
        while not small.done:
            engine.step()
        waited = engine.steps_run - arrival
        if bound is not None:
            assert waited <= bound and not big.done, waited
        else:
            assert waited > 10 and big.done, waited  # 40 / 8 batches of 3 steps first
        engine.run()


def test_a_cancelled_request_frees_its_slots_at_the_next_step(model):
    engine = engine_of(model, max_batch=4)
    settings = SampleSettings(sampler="ddim", steps=20, guidance=0.0)
    first = engine.submit(request(settings, range(4)))
    engine.step()
    second = engine.submit(request(settings, range(4, 8)))
    engine.step()
    assert engine.active == 4 and second.admitted == 0
    first.cancel()
    engine.step()
    assert first.done and first.images is None and second.admitted == 4 and engine.active == 4
    engine.run()
    assert second.wait().shape == (4, *SHAPE)


def test_the_plan_table_is_compacted_when_full(model):
    engine = engine_of(model, max_batch=4)
    engine.table = type(engine.table)(DIFFUSION, torch.device("cpu"), capacity=12)
    requests = [engine.submit(request(SampleSettings(sampler="ddim", steps=s, guidance=0.0), [s])) for s in (5, 6, 7, 4)]
    engine.run()
    for r in requests:
        assert (r.wait() - reference(model, r.settings, r.labels, r.keys)).abs().max() <= 1e-4


class Broken(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.fail = model, False

    def forward(self, x, t, y):
        if self.fail:
            raise RuntimeError("device lost")
        return self.model(x, t, y) * (float("nan") if (y == 9).any() else 1.0)


def test_failures_end_only_their_requests(model):
    broken = Broken(model)
    engine = engine_of(broken)
    settings = SampleSettings(sampler="ddim", steps=2, guidance=0.0)
    nan = engine.submit(Request(settings, torch.tensor([9]), image_keys(0, torch.arange(1))))
    engine.run()
    with pytest.raises(NonFiniteImages, match="NaN"):
        nan.wait()
    doomed = engine.submit(request(settings, range(2)))
    broken.fail = True
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    engine.fail_active(RuntimeError("device lost"))
    with pytest.raises(RuntimeError, match="device lost"):
        doomed.wait(timeout=0)
    broken.fail = False
    fine = engine.submit(request(settings, range(2)))
    engine.run()
    assert fine.wait().shape == (2, *SHAPE)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(request(settings, range(1)))


def test_bad_settings_are_refused_on_submit(model):
    engine = engine_of(model)
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit(request(SampleSettings(steps=101), range(1)))
    with pytest.raises(ValueError, match="unknown sampler"):
        engine.submit(request(SampleSettings(sampler="euler"), range(1)))
    with pytest.raises(ValueError, match="eta"):
        engine.submit(request(SampleSettings(sampler="ddim", eta=-1.0), range(1)))
    assert engine.idle()  # nothing refused reached the batch
