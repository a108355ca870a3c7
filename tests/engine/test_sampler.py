"""Samplers on Gaussian data, where the optimal epsilon predictor has a closed form."""

import pytest
import torch
from torch import nn

from engine.config import DiffusionConfig
from engine.diffusion import alpha_bar
from engine.generate import Runner, guided_eps
from engine.noise import image_keys
from engine.sampler import SampleSettings, ddim_plan, ddpm_plan, step, timestep_sequence

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


def run(plan, model, labels, null_class=2, guidance=0.0):
    keys = image_keys(123, torch.arange(len(labels)))
    return Runner("oracle", model, plan, SHAPE, null_class, guidance)(labels, keys)


MEANS = torch.stack([torch.full(SHAPE, 0.5), torch.full(SHAPE, -0.3), torch.zeros(SHAPE)])
STD = 0.2


def sample_std_error(plan) -> float:
    """Sample 2 x 500 images of two classes; check the means, return the worst relative std error."""
    labels = torch.tensor([0, 1]).repeat(500)
    x = run(plan, GaussianOracle(DiffusionConfig(), MEANS, STD), labels)
    errors = []
    for c in (0, 1):
        xc = x[labels == c]
        assert xc.mean().item() == pytest.approx(MEANS[c, 0, 0, 0].item(), abs=0.01)
        errors.append(abs(xc.std().item() / STD - 1))
    return max(errors)


@pytest.mark.parametrize("make_plan", [
    lambda d: ddpm_plan(d, variance="large"),
    lambda d: ddpm_plan(d, variance="small"),
    lambda d: ddim_plan(d, steps=1000, eta=0.0),
    lambda d: ddim_plan(d, steps=1000, eta=1.0),
], ids=["ddpm-large", "ddpm-small", "ddim-eta0", "ddim-eta1"])
def test_samples_have_the_data_mean_and_variance(make_plan):
    # With all T steps the discretisation error is small: the samples follow the data.
    assert sample_std_error(make_plan(DiffusionConfig())) < 0.04


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_fewer_steps_converge_to_the_data_variance(sampler):
    # With S < T steps the error is the discretisation's: it shrinks as S grows, and the
    # quadratic spacing (dense near t = 0, where narrow data is resolved) beats uniform at S = 50.
    d = DiffusionConfig()
    make = (lambda s, sp: ddpm_plan(d, s, "small", sp)) if sampler == "ddpm" else (lambda s, sp: ddim_plan(d, s, 0.0, sp))
    e50, e200 = sample_std_error(make(50, "uniform")), sample_std_error(make(200, "uniform"))
    assert e200 < e50
    assert sample_std_error(make(50, "quadratic")) < e50


def test_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    # Song et al. 2020, section 4.1: sigma(eta = 1) makes the DDIM update the DDPM one.
    diffusion = DiffusionConfig()
    ddim, ddpm = ddim_plan(diffusion, steps=40, eta=1.0), ddpm_plan(diffusion, steps=40, variance="small")
    assert torch.allclose(ddim.sigma, ddpm.sigma, atol=1e-6)
    x, eps, z = torch.randn(3, 4, *SHAPE)
    for i in (0, 1, 17, 39):
        assert torch.allclose(step(ddim, i, x, eps, z), step(ddpm, i, x, eps, z), atol=1e-4)


def test_full_ddpm_plan_follows_algorithm_2():
    # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) + sigma_t z, sigma_t^2 = beta_t.
    diffusion = DiffusionConfig()
    plan = ddpm_plan(diffusion, variance="large")
    ab = alpha_bar(diffusion)
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])
    x, eps, z = torch.randn(3, 4, *SHAPE, dtype=torch.float64).float()
    for t in (999, 500, 1):
        expected = (x - betas[t] / (1 - ab[t]).sqrt() * eps) / (1 - betas[t]).sqrt() + betas[t].sqrt() * z
        assert torch.allclose(step(plan, t, x, eps, z), expected.float(), atol=1e-4)
    # Algorithm 2 adds no noise at t = 1.
    assert plan.sigma[0].item() == 0.0


@pytest.mark.parametrize("spacing", ["uniform", "quadratic"])
@pytest.mark.parametrize("steps", [1, 2, 7, 50, 333, 1000])
def test_timestep_sequence(spacing, steps):
    seq = timestep_sequence(1000, steps, spacing)
    assert len(seq) == steps
    assert seq[-1].item() == 999
    assert (seq.diff() > 0).all()
    assert seq[0].item() >= 0
    if steps > 1:
        assert seq[0].item() == 0


@pytest.mark.parametrize("steps", [0, 1001])
def test_timestep_sequence_rejects_bad_step_counts(steps):
    with pytest.raises(ValueError):
        timestep_sequence(1000, steps)


def test_guidance_is_one_batched_call_equal_to_two_separate_calls():
    torch.manual_seed(0)
    means = torch.randn(3, *SHAPE)
    model = GaussianOracle(DiffusionConfig(), means, 0.5)
    x, t, y = torch.randn(5, *SHAPE), torch.randint(0, 1000, (5,)), torch.tensor([0, 1, 0, 1, 1])
    w = 1.8
    guided = guided_eps(model, x, t, y, w, null_class=2)
    assert model.calls == [10]  # ONE call on the 2B batch
    eps_c, eps_u = model(x, t, y), model(x, t, torch.full_like(y, 2))
    assert torch.allclose(guided, (1 + w) * eps_c - w * eps_u, atol=1e-5)


def test_zero_guidance_is_the_conditional_model():
    model = GaussianOracle(DiffusionConfig(), torch.randn(3, *SHAPE), 0.5)
    x, t, y = torch.randn(4, *SHAPE), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 1, 0])
    assert torch.equal(guided_eps(model, x, t, y, 0.0, null_class=2), model(x, t, y))


def test_sample_settings_resolve_their_steps():
    diffusion = DiffusionConfig(num_timesteps=100)
    assert SampleSettings(sampler="ddpm").num_steps(100) == 100
    assert SampleSettings(sampler="ddim").num_steps(100) == 50
    assert SampleSettings(sampler="ddim").num_steps(20) == 20  # a model with T < 50
    assert SampleSettings(sampler="ddim", steps=7).plan(diffusion).num_steps == 7
    with pytest.raises(ValueError, match="exceeds the model's T = 100"):
        SampleSettings(steps=101).plan(diffusion)
    with pytest.raises(ValueError, match="unknown sampler"):
        SampleSettings(sampler="euler").plan(diffusion)
