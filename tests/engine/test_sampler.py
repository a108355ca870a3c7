"""Samplers on Gaussian data, where the optimal epsilon predictor has a closed form."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from engine.config import DiffusionConfig
from engine.core import Engine
from engine.diffusion import alpha_bar
from engine.generate import sample_tensor
from engine.noise import image_keys
from engine.sampler import bound_x0, ddim_plan, ddpm_plan, timestep_sequence, update
from engine.settings import SampleSettings

SHAPE = (2, 3, 3)


class GaussianOracle(nn.Module):
    """The Bayes-optimal eps for x_0 ~ N(mu_y, s^2 I): with x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps,
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu_y) / (ab s^2 + 1 - ab)."""

    def __init__(self, diffusion, means, std):
        super().__init__()
        self.ab = alpha_bar(diffusion).float()
        self.means, self.std = means, std
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(len(x))
        ab = self.ab[t].view(-1, 1, 1, 1)
        mu = self.means[y]
        return (1 - ab).sqrt() * (x - ab.sqrt() * mu) / (ab * self.std**2 + 1 - ab)


def run(settings, model, labels, x_T=None, keys=None, null_class=2):
    """x_0 of these rows through the sampling engine, all in one batch."""
    keys = image_keys(123, torch.arange(len(labels))) if keys is None else keys
    engine = Engine("oracle", model, DiffusionConfig(), SHAPE, null_class, max_batch=len(labels))
    return sample_tensor(engine, settings, labels, keys, x_T)


MEANS = torch.stack([torch.full(SHAPE, 0.5), torch.full(SHAPE, -0.3), torch.zeros(SHAPE)])
STD = 0.2


def sample_std_error(settings) -> float:
    """Sample 2 x 500 images of two classes; check the means, return the worst relative std error."""
    labels = torch.tensor([0, 1]).repeat(500)
    x = run(settings, GaussianOracle(DiffusionConfig(), MEANS, STD), labels)
    errors = []
    for c in (0, 1):
        xc = x[labels == c]
        assert xc.mean().item() == pytest.approx(MEANS[c, 0, 0, 0].item(), abs=0.01)
        errors.append(abs(xc.std().item() / STD - 1))
    return max(errors)


@pytest.mark.parametrize("settings", [
    SampleSettings(sampler="ddpm", variance="large", guidance=0.0),
    SampleSettings(sampler="ddpm", variance="small", guidance=0.0),
    SampleSettings(sampler="ddim", steps=1000, eta=0.0, guidance=0.0),
    SampleSettings(sampler="ddim", steps=1000, eta=1.0, guidance=0.0),
], ids=["ddpm-large", "ddpm-small", "ddim-eta0", "ddim-eta1"])
def test_samples_have_the_data_mean_and_variance(settings):
    # With all T steps the discretisation error is small: the samples follow the data.
    assert sample_std_error(settings) < 0.04


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fewer_steps_converge_to_the_data_variance(sampler):
    # With S < T steps the error is the discretisation's: it shrinks as S grows, and the
    # quadratic spacing (dense near t = 0, where narrow data is resolved) beats linspace at S = 50.
    make = lambda s, sp: SampleSettings(sampler=sampler, steps=s, eta=0.0, variance="small", spacing=sp, guidance=0.0)
    e50, e200 = sample_std_error(make(50, "linspace")), sample_std_error(make(200, "linspace"))
    assert e200 < e50
    assert sample_std_error(make(50, "quadratic")) < e50


def test_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    # Song et al. 2020, section 4.1: sigma(eta = 1) makes the DDIM update the DDPM one.
    diffusion = DiffusionConfig()
    ddim, ddpm = ddim_plan(diffusion, steps=40, eta=1.0), ddpm_plan(diffusion, steps=40, variance="small")
    assert torch.allclose(ddim.sigma, ddpm.sigma, atol=1e-6)
    x, eps, z, x0_prev = torch.randn(4, 4, *SHAPE)
    for i in (0, 1, 17, 39):
        assert torch.allclose(update(ddim, i, x, eps, z, x0_prev)[0], update(ddpm, i, x, eps, z, x0_prev)[0], atol=1e-4)


def test_full_ddpm_plan_follows_algorithm_2():
    # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) + sigma_t z, sigma_t^2 = beta_t.
    diffusion = DiffusionConfig()
    plan = ddpm_plan(diffusion, variance="large")
    ab = alpha_bar(diffusion)
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    x, eps, z = torch.randn(3, 4, *SHAPE, dtype=torch.float64).float()
    for t in (999, 500, 1):
        expected = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / (1 - betas[t]).sqrt() + betas[t].sqrt() * z
        assert torch.allclose(update(plan, t, x, eps, z, torch.randn_like(x))[0], expected.float(), atol=1e-4)
    # Algorithm 2 adds no noise at t = 1.
    assert plan.sigma[0].item() == 0.0


@pytest.mark.parametrize("spacing, s10", [
    # The sequences written out from their definitions (diffusers' set_timesteps, the DDIM paper's code).
    ("linspace", [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]),
    ("leading", [0, 100, 200, 300, 400, 500, 600, 700, 800, 900]),
    ("trailing", [99, 199, 299, 399, 499, 599, 699, 799, 899, 999]),
    ("quadratic", [0, 9, 39, 88, 158, 246, 355, 483, 632, 800]),
])
def test_timestep_spacings(spacing, s10):
    assert timestep_sequence(1000, 10, spacing).tolist() == s10
    for steps in (1, 2, 7, 50, 333, 1000):
        seq = timestep_sequence(1000, steps, spacing)
        assert len(seq) == steps and (seq.diff() > 0).all() and 0 <= seq[0] and seq[-1] <= 999
    assert timestep_sequence(1000, 3, "trailing").tolist() == [332, 666, 999]  # round(1000 - 1000 k / 3) - 1


@pytest.mark.parametrize("steps", [0, 1001])
def test_timestep_sequence_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError):
        timestep_sequence(1000, steps)


def guided_reference(model, x, t, y, w, null_class=2):
    """(1 + w) eps(x, c) - w eps(x, null) from two separate calls."""
    return (1 + w) * model(x, t, y) - w * model(x, t, torch.full_like(y, null_class))


def test_guidance_is_one_batched_call_equal_to_two_separate_calls():
    torch.manual_seed(0)
    model = GaussianOracle(DiffusionConfig(), torch.randn(3, *SHAPE), 0.5)
    y, x_T = torch.tensor([0, 1, 0, 1, 1]), torch.randn(5, *SHAPE)
    w = 1.8
    settings = SampleSettings(sampler="ddim", steps=1, guidance=w)
    x0 = run(settings, model, y, x_T)
    assert model.calls == [10]  # ONE call on the 2B batch
    plan = settings.plan(DiffusionConfig())
    eps = guided_reference(model, x_T, plan.timesteps.expand(5), y, w)
    reference = update(plan, 0, x_T, eps, torch.zeros_like(x_T), torch.zeros_like(x_T), threshold=settings.threshold)[0]
    assert torch.allclose(x0, reference, atol=1e-5)

def test_zero_guidance_is_the_conditional_model_alone():
    torch.manual_seed(0)
    model = GaussianOracle(DiffusionConfig(), torch.randn(3, *SHAPE), 0.5)
    y, x_T = torch.tensor([0, 1, 1, 0]), torch.randn(4, *SHAPE)
    settings = SampleSettings(sampler="ddim", steps=1, guidance=0.0)
    x0 = run(settings, model, y, x_T)
    assert model.calls == [4]  # no unconditional half
    plan = settings.plan(DiffusionConfig())
    eps = model(x_T, plan.timesteps.expand(4), y)
    zeros = torch.zeros_like(x_T)
    assert torch.equal(x0, update(plan, 0, x_T, eps, zeros, zeros, threshold=settings.threshold)[0])


def test_sample_settings_resolve_their_steps():
    diffusion = DiffusionConfig(num_timesteps=100)
    assert SampleSettings(sampler="ddpm").num_steps(100) == 100
    assert SampleSettings(sampler="ddim").num_steps(100) == 50
    assert SampleSettings(sampler="ddim").num_steps(20) == 20  # a model with T < 50
    assert SampleSettings(sampler="dpm++2m").num_steps(1000) == 15
    assert SampleSettings(sampler="ddim", steps=7).plan(diffusion).num_steps == 7
    with pytest.raises(ValueError, match="exceeds the model's T = 100"):
        SampleSettings(steps=101).plan(diffusion)
    with pytest.raises(ValueError, match="unknown sampler"):
        SampleSettings(sampler="euler").plan(diffusion)


def exact_ode_solution(x_start, ab_start, mean, std):
    """The probability-flow ODE from x at ab_start to t = 0, for x_0 ~ N(mean, std^2 I): the marginal
    at t is N(sqrt(ab) mean, (ab std^2 + 1 - ab) I), and the flow keeps each coordinate's
    standardized value, so x_0 = mean + std (x - sqrt(ab) mean) / sqrt(ab std^2 + 1 - ab)."""
    return mean + std * (x_start - ab_start.sqrt() * mean) / (ab_start * std**2 + 1 - ab_start).sqrt()


@pytest.mark.parametrize("sampler, low, high", [("ddim", 1.7, 2.3), ("dpm++2m", 3.5, None)])
def test_ode_samplers_converge_at_their_order(sampler, low, high):
    """On Gaussian data with the exact eps, the deterministic samplers' error against the ODE's
    closed-form solution falls as S^-order: doubling the steps divides it by ~2 for DDIM (first
    order) and by 4 or more for DPM-Solver++(2M) (second order). The quadratic spacing ends at
    t = 0, so the final jump to the clean image (first order in both) adds only ~1e-4."""
    diffusion = DiffusionConfig()
    model = GaussianOracle(diffusion, MEANS, STD)
    labels = torch.tensor([0, 1, 0, 1])
    keys = image_keys(7, torch.arange(4))
    x_T = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (20, 40, 80):
        settings = SampleSettings(sampler=sampler, steps=steps, spacing="quadratic", guidance=0.0)
        plan = settings.plan(diffusion)
        x0 = run(settings, model, labels, x_T, keys)
        ab_start = alpha_bar(diffusion)[plan.timesteps[-1]]
        exact = exact_ode_solution(x_T.double(), ab_start, MEANS[labels].double(), STD)
        errors.append((x0.double() - exact).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(low < r and (high is None or r < high) for r in ratios), (errors, ratios)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_dpm_solver_matches_diffusers(spacing):
    """DPM-Solver++(2M) against diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, final step
    to sigma 0) on the Gaussian oracle, guided: the same timesteps for every spacing name, 1-25 steps,
    and the same images."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the oracle")
    diffusion = DiffusionConfig()
    model = GaussianOracle(diffusion, MEANS, STD)
    labels, keys, w = torch.tensor([0, 1, 1]), image_keys(3, torch.arange(3)), 1.5
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    for steps in range(1, 26):
        settings = SampleSettings(sampler="dpm++2m", steps=steps, spacing=spacing, guidance=w, threshold=0.0)
        plan = settings.plan(diffusion)
        scheduler = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
            algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
            timestep_spacing=spacing, final_sigmas_type="zero", lower_order_final=True)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == plan.timesteps.flip(0).tolist(), steps
        if steps not in (1, 2, 5, 15, 20, 25):
            continue
        # Ours runs in float32; x0_hat = (x - sigma eps) / alpha at t = 999 (alpha = 0.006) scales
        # float32 rounding by 1/alpha, so a one-step run carries ~1e-5 on its own.
        ours = run(settings, model, labels, x_T, keys)
        x = x_T.clone().double()  # diffusers in float64: the reference
        for t in scheduler.timesteps:
            tt = torch.full((3,), int(t))
            eps = guided_reference(model, x.float(), tt, labels, w).double()
            x = scheduler.step(eps, t, x).prev_sample
        error = ((ours.double() - x).norm() / x.norm()).item()
        assert error < (2e-5 if plan.timesteps[-1] > 990 and steps == 1 else 1e-5), (steps, error)


def test_the_default_dpm_grid_is_linspace_with_t0():
    """dpm++2m's default, linspace-t0, is DDIM's linspace (the last model call at t = 0, FID 47.0 vs 71.5
    on the bundled model); `linspace` is diffusers' DPM grid (t = 0 dropped); for DDIM both names agree."""
    diffusion = DiffusionConfig()
    default = SampleSettings(sampler="dpm++2m").plan(diffusion).timesteps
    assert default.tolist() == timestep_sequence(1000, 15, "linspace").tolist() and default[0] == 0
    assert default[1:4].tolist() == [71, 143, 214]
    named = SampleSettings(sampler="dpm++2m", spacing="linspace").plan(diffusion).timesteps
    assert named[0] == 67 and named[-1] == 999
    ddim = [SampleSettings(sampler="ddim", spacing=s).plan(diffusion).timesteps.tolist()
            for s in ("linspace", "linspace-t0")]
    assert ddim[0] == ddim[1]


@pytest.mark.parametrize("ratio", [0.6, 0.995])
def test_dynamic_thresholding_matches_diffusers(ratio):
    """--threshold P against diffusers' DPMSolverMultistepScheduler(thresholding=True,
    dynamic_thresholding_ratio=P) with no upper bound on s (Imagen's rule), guided, on data beyond
    [-1, 1] where the thresholding bites; and against DPM-Solver++ without it, to show it did."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers (test extra) is the oracle")
    diffusion = DiffusionConfig()
    model = GaussianOracle(diffusion, torch.stack([torch.full(SHAPE, 1.4), torch.full(SHAPE, -0.6),
                                                   torch.zeros(SHAPE)]), 0.4)
    labels, keys, w = torch.tensor([0, 1, 0]), image_keys(3, torch.arange(3)), 2.0
    x_T = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    settings = SampleSettings(sampler="dpm++2m", steps=10, spacing="trailing", guidance=w, threshold=ratio)
    ours = run(settings, model, labels, x_T, keys)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
        timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True,
        thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=1e9)
    scheduler.set_timesteps(10)
    x = x_T.clone().double()
    for t in scheduler.timesteps:
        eps = guided_reference(model, x.float(), torch.full((3,), int(t)), labels, w).double()
        x = scheduler.step(eps, t, x).prev_sample
    assert ((ours.double() - x).norm() / x.norm()).item() < 1e-5
    plain = run(replace(settings, threshold=0.0), model, labels, x_T, keys)
    assert (plain - ours).abs().max() > 0.1 and ours.abs().max() <= 1 + 1e-5 < plain.abs().max()



def test_clipping_asked_for_overrides_the_default_thresholding():
    """--clip-x0 is static clipping (diffusers' clip_sample) even with thresholding on, row by row."""
    x0 = torch.randn(3, *SHAPE) * 3
    clip = torch.tensor([True, False, False]).view(-1, 1, 1, 1)
    p = torch.tensor([0.995, 0.995, 0.0]).view(-1, 1, 1, 1)
    bounded, rows = bound_x0(x0, clip, p)
    assert torch.equal(bounded[0], x0[0].clamp(-1, 1)) and torch.equal(bounded[2], x0[2])
    s = torch.quantile(x0[1].abs().flatten(), 0.995)
    assert s > 1 and torch.allclose(bounded[1], x0[1].clamp(-s, s) / s)
    assert rows.flatten().tolist() == [True, True, False]
    assert torch.equal(bound_x0(x0, True, 0.995)[0], x0.clamp(-1, 1))
