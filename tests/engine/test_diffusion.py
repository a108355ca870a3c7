import math

import pytest
import torch

from engine.config import DiffusionConfig
from engine.diffusion import alpha_bar, eps_loss, make_betas, q_sample


def test_linear_schedule_matches_ho_et_al():
    betas = make_betas(DiffusionConfig())
    assert betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    # Linear: constant increments of (0.02 - 1e-4) / 999.
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_alpha_bar_is_cumulative_product():
    config = DiffusionConfig(num_timesteps=10, beta_start=0.1, beta_end=0.5)
    betas = [0.1 + k * 0.4 / 9 for k in range(10)]
    expected = [math.prod(1 - b for b in betas[: k + 1]) for k in range(10)]
    assert torch.allclose(alpha_bar(config), torch.tensor(expected, dtype=torch.float64))


def test_cosine_schedule_matches_nichol_dhariwal():
    T, s = 1000, 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    ab = alpha_bar(DiffusionConfig(beta_schedule="cosine"))
    for t in (0, 10, 500, 900):
        # alpha-bar at 0-based step t is the paper's alpha-bar_{t+1} = f(t+1) / f(0).
        assert ab[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert make_betas(DiffusionConfig(beta_schedule="cosine")).max().item() <= 0.999


def test_q_sample_moments():
    ab = alpha_bar(DiffusionConfig())
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    t = torch.full((20000,), 300)
    x_t = q_sample(x0, t, torch.randn_like(x0), ab)
    assert x_t.mean().item() == pytest.approx(ab[300].sqrt().item() * 0.7, abs=0.02)
    assert x_t.var().item() == pytest.approx(1 - ab[300].item(), rel=0.05)


@pytest.mark.parametrize("bad", [dict(num_timesteps=0), dict(beta_schedule="sigmoid"), dict(beta_start=0.1, beta_end=0.01)])
def test_bad_diffusion_config_is_rejected(bad):
    with pytest.raises(ValueError):
        make_betas(DiffusionConfig(**bad))


def test_min_snr_gamma_weights_each_sample_by_its_clipped_snr():
    ab = alpha_bar(DiffusionConfig())
    torch.manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0, 200, 600, 999])
    y = torch.zeros(4, dtype=torch.long)

    def model(x_t, t_, y_):
        return 0.5 * x_t  # any fixed function of x_t

    plain = eps_loss(model, x0, y, t, noise, ab)
    weighted = eps_loss(model, x0, y, t, noise, ab, min_snr_gamma=5.0)
    # By hand, in float64: x_t = sqrt(ab) x0 + sqrt(1 - ab) noise, per-sample MSE, weight min(SNR, 5) / SNR.
    a = ab[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
    mse = (0.5 * x_t - noise.double()).square().flatten(1).mean(1)
    snr = ab[t] / (1 - ab[t])
    expected = (torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr * mse).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain.item() == pytest.approx(mse.mean().item(), rel=1e-5)
    assert snr[0] > 5 > snr[-1]  # the test covers both sides of the clip
    # A gamma above every SNR weights nothing: plain L_simple.
    assert eps_loss(model, x0, y, t, noise, ab, min_snr_gamma=1e9).item() == pytest.approx(plain.item(), rel=1e-6)
