"""The sampling engine: an image does not depend on what shares its batch; admission is fair (a small
request beside a big one and a big one in a stream of small ones both finish within stated bounds);
cancelled rows leave at the next step; a request is checked whole on submit, and a step that fails
anyway ends only the requests that make it fail; the batch's invariants hold after every step."""

import math
from dataclasses import replace

import pytest
import torch

from engine.config import DiffusionConfig, ModelConfig
from engine.core import Engine, EngineClosed, NonFiniteImages, Request, fair_shares
from engine.diffusion import alpha_bar
from engine.formats.checkpoint import Checkpoint
from engine.noise import INITIAL_STREAM, gaussian_noise, image_keys
from engine.sampler import update
from engine.settings import SampleSettings
from tests import support
from tests.support import random_unet

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
    return random_unet(CONFIG)


def engine_of(model, max_batch=8, admission="step", name="eager"):
    return support.engine_of(model, DIFFUSION, SHAPE, NULL, max_batch=max_batch, admission=admission, name=name)


def request(settings, indices, seed=3, classes=(1, 4, 7)):
    indices = torch.as_tensor(indices)
    labels = torch.tensor(classes)[indices % len(classes)]
    return Request(settings, labels, image_keys(seed, indices))


@torch.no_grad()
def reference(model, settings, labels, keys):
    """Today's `ddpm-engine sample` loop, written out: one batch from x_T to x_0, guidance from two
    separate model calls (only at the steps whose sigma_t is in the guidance interval, if any), the
    plan's step i with the images' noise of stream i."""
    plan = settings.plan(DIFFUSION)
    x = gaussian_noise(keys, INITIAL_STREAM, SHAPE)
    x0 = torch.zeros_like(x)
    ab = alpha_bar(DIFFUSION)
    for i in reversed(range(plan.num_steps)):
        t = plan.timesteps[i].expand(len(x))
        eps = model(x, t, labels)
        sigma = float(((1 - ab[plan.timesteps[i]]) / ab[plan.timesteps[i]]).sqrt())
        lo, hi = settings.guidance_interval or (-1.0, math.inf)
        w = settings.guidance if lo < sigma <= hi else 0.0
        if w:
            eps = (1 + w) * eps - w * model(x, t, torch.full_like(labels, NULL))
        x, x0 = update(plan, i, x, eps, gaussian_noise(keys, i, SHAPE), x0, settings.clip_x0, settings.threshold)
    return x


def run_checked(engine):
    """engine.run(), with the batch's invariants checked after every step."""
    while engine.step():
        engine.check()
    engine.check()


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
    run_checked(engine)
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


def test_a_guidance_interval_guides_only_its_steps_and_shrinks_the_other_calls(model):
    """Guidance at sigma_t in (lo, hi] only (Kynkäänniemi et al. 2024): the steps outside make no
    unconditional rows (the U-Net batch shrinks), and the images equal the reference loop that guides
    only those steps, alone and beside requests guided at every step, unguided, or with another interval."""
    ab = alpha_bar(DIFFUSION)
    plan = SampleSettings(sampler="ddim", steps=6).plan(DIFFUSION)
    sigmas = [float(((1 - ab[t]) / ab[t]).sqrt()) for t in plan.timesteps]  # increasing with i
    interval = (sigmas[1], sigmas[3])  # guides steps i = 2, 3 only
    mine = SampleSettings(sampler="ddim", steps=6, guidance=2.0, guidance_interval=interval)
    counted = CallSizes(model)
    engine = engine_of(counted)
    alone = engine.submit(request(mine, range(3)))
    run_checked(engine)
    assert counted.sizes == [3, 3, 6, 6, 3, 3]  # i = 5..0: only i = 3, 2 call the null class too
    want = reference(model, mine, alone.labels, alone.keys)
    assert (alone.wait() - want).abs().max() <= 1e-4
    assert (want - reference(model, replace(mine, guidance_interval=None), alone.labels, alone.keys)).abs().max() > 1e-3
    engine = engine_of(model)
    others = [engine.submit(request(s, range(10 + 3 * k, 13 + 3 * k), seed=k)) for k, s in enumerate([
        SampleSettings(sampler="ddim", steps=6, guidance=2.0), SampleSettings(sampler="ddpm", steps=9, guidance=0.0),
        SampleSettings(sampler="dpm++2m", steps=5, guidance=1.0, guidance_interval=(0.0, sigmas[2]))])]
    engine.step()
    mixed = engine.submit(request(mine, range(3)))
    run_checked(engine)
    assert (mixed.wait() - want).abs().max() <= 1e-4
    for other in others:
        assert (other.wait() - reference(model, other.settings, other.labels, other.keys)).abs().max() <= 1e-4


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
    broken.fail = True  # every call fails: no request's rows run alone either, so all in the batch fail
    assert engine.step()
    with pytest.raises(RuntimeError, match="device lost"):
        doomed.wait(timeout=0)
    assert engine.idle()
    broken.fail = False
    fine = engine.submit(request(settings, range(2)))
    engine.run()
    assert fine.wait().shape == (2, *SHAPE)
    engine.close()
    with pytest.raises(EngineClosed):
        engine.submit(request(settings, range(1)))


class Poisoned(torch.nn.Module):
    """Raises on any batch holding label 9: a request that passes every check but makes the step fail."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        if (y == 9).any():
            raise RuntimeError("poisoned row")
        return self.model(x, t, y)


def test_a_request_that_makes_the_step_fail_fails_alone(model):
    settings = SampleSettings(sampler="ddim", steps=4, guidance=1.0)
    alone = engine_of(model)
    want = alone.submit(request(settings, range(3)))
    alone.run()
    engine = engine_of(Poisoned(model))
    valid = engine.submit(request(settings, range(3)))
    engine.step()
    poison = engine.submit(Request(SampleSettings(sampler="ddpm", steps=5), torch.tensor([9, 1]),
                                   image_keys(7, torch.arange(2))))
    later = engine.submit(request(SampleSettings(sampler="ddim", steps=3, guidance=0.0), range(2), seed=5))
    run_checked(engine)
    with pytest.raises(RuntimeError, match="poisoned row"):
        poison.wait(timeout=0)
    assert (valid.wait() - want.wait()).abs().max() <= 1e-4  # as alone: the failure beside it changed nothing
    assert later.wait().shape == (2, *SHAPE)


POISON = [  # a bad value of every sampling field, and of the request's own tensors
    dict(settings=SampleSettings(sampler="euler")), dict(settings=SampleSettings(steps=0)),
    dict(settings=SampleSettings(steps=101)), dict(settings=SampleSettings(steps=2.5)),
    dict(settings=SampleSettings(eta=float("nan"))), dict(settings=SampleSettings(eta=-1.0)),
    dict(settings=SampleSettings(variance=None)), dict(settings=SampleSettings(spacing="cubic")),
    dict(settings=SampleSettings(guidance=float("inf"))), dict(settings=SampleSettings(guidance=True)),
    dict(settings=SampleSettings(clip_x0=None)), dict(settings=SampleSettings(threshold=None)),
    dict(settings=SampleSettings(threshold=2.0)), dict(labels=torch.tensor([99])), dict(labels=torch.tensor([-1])),
    dict(labels=torch.tensor([0.5])), dict(keys=torch.tensor([1, 2])), dict(keys=torch.tensor([1.0])),
    dict(x_T=torch.zeros(1, 3, 8, 8)), dict(x_T=torch.full((1, *SHAPE), float("nan"))),
]


@pytest.mark.parametrize("poison", POISON, ids=lambda p: "-".join(f"{k}" for k in p))
def test_a_poison_request_is_refused_on_submit_and_its_neighbour_is_unchanged(model, poison):
    settings = SampleSettings(sampler="ddim", steps=3, guidance=1.0)
    engine = engine_of(model)
    valid = engine.submit(request(settings, range(2)))
    fields = dict(settings=SampleSettings(sampler="ddim", steps=3), labels=torch.tensor([1]),
                  keys=image_keys(0, torch.arange(1)), x_T=None)
    with pytest.raises(ValueError):
        engine.submit(Request(**{**fields, **poison}))
    engine.run()
    assert (valid.wait() - reference(model, settings, valid.labels, valid.keys)).abs().max() <= 1e-4


def test_fair_shares_split_the_free_slots_max_min_with_the_rest_to_the_oldest():
    assert fair_shares([32, 1], 8) == [7, 1]          # the small one takes what it needs at once
    assert fair_shares([5, 5, 5], 6) == [2, 2, 2]
    assert fair_shares([5, 5, 5], 7) == [3, 2, 2]     # the slot that does not divide goes to the oldest
    assert fair_shares([1, 9, 2], 8) == [1, 5, 2]
    assert fair_shares([4, 4, 4, 4], 2) == [1, 1, 0, 0]
    assert fair_shares([0, 3], 5) == [0, 3] and fair_shares([3], 0) == [0]
    for needs, free in [([7, 1, 1, 3], 5), ([2] * 9, 4), ([16, 1, 1, 1, 1], 3), ([3, 8, 1], 20)]:
        shares = fair_shares(needs, free)
        assert sum(shares) == min(free, sum(needs)) and all(0 <= s <= n for s, n in zip(shares, needs))
        for k, share in enumerate(shares):  # never passed over for a younger request
            if share == 0 and needs[k] > 0:
                assert all(s == 0 for s in shares[k + 1:])


def test_a_big_request_in_a_steady_stream_of_small_ones_finishes_within_its_bound(model):
    """A 16-image request (max batch 8, S = 3 steps: 2 batches, 6 steps alone) arriving in a stream of
    1-image requests that keeps the batch full (two new ones a step, about what frees up) is never passed
    over for a younger one: in a step where any request that came after it gets a slot, it gets one too.
    So it finishes within 5x its solo steps (measured: 4.2x); under the old fewest-admitted-first order it waited for the
    stream to end. Every small one is still answered within 2S + 2 steps of its arrival."""
    settings = SampleSettings(sampler="ddim", steps=3, guidance=0.0)
    engine = engine_of(model, max_batch=8)
    arrived, answered = {}, {}

    def small(k):
        r = request(settings, [k])
        r.on_done = lambda done: answered.__setitem__(done, engine.steps_run)
        arrived[engine.submit(r)] = engine.steps_run

    for k in range(8):
        small(k)
    engine.step()
    big = engine.submit(request(settings, range(100, 116)))
    start = engine.steps_run
    while not big.done:
        small(len(arrived))
        small(len(arrived))
        younger = [r for r in arrived if r.sequence > big.sequence]
        before = big.admitted, [r.admitted for r in younger]
        engine.step()
        engine.check()
        if any(r.admitted > k for r, k in zip(younger, before[1])):
            assert big.admitted > before[0] or big.admitted == big.n, "passed over for a younger request"
        assert engine.steps_run - start <= 5 * 6, f"the big request starved: {big.admitted} of 16 admitted"
    engine.run()
    assert len(arrived) > 16 and set(answered) == set(arrived)  # the stream really ran beside it
    assert max(answered[r] - arrived[r] for r in arrived) <= 2 * 3 + 2


def test_bad_settings_are_refused_on_submit(model):
    engine = engine_of(model)
    with pytest.raises(ValueError, match="steps: 101 exceeds"):
        engine.submit(request(SampleSettings(steps=101), range(1)))
    with pytest.raises(ValueError, match="unknown sampler"):
        engine.submit(request(SampleSettings(sampler="euler"), range(1)))
    with pytest.raises(ValueError, match="eta"):
        engine.submit(request(SampleSettings(sampler="ddim", eta=-1.0), range(1)))
    assert engine.idle()  # nothing refused reached the batch
