"""The forward process and the training loss of DDPM (Ho et al. 2020).

Notation map (code name = paper symbol):
  betas[t]      = beta_{t+1}          variance of step t+1 of the forward process
  alphas[t]     = alpha_{t+1}         = 1 - beta_{t+1}
  alpha_bar[t]  = alpha-bar_{t+1}     = prod_{s <= t+1} alpha_s
Timesteps are 0-based in code: t = 0 is the paper's t = 1.
"""

from __future__ import annotations

import math

import torch

from engine.config import DiffusionConfig


def make_betas(config: DiffusionConfig) -> torch.Tensor:
    """beta_1..beta_T in float64."""
    config.validate()
    T = config.num_timesteps
    if config.beta_schedule == "linear":
        # Ho et al. 2020, section 4: linear from 1e-4 to 0.02 over T = 1000.
        return torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float64)
    # Nichol & Dhariwal 2021, Eq. 17: alpha-bar_t = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) * pi/2),
    # with beta_t clipped at 0.999.
    s = 0.008
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=0.999)


def alpha_bar(config: DiffusionConfig) -> torch.Tensor:
    """alpha-bar_t = prod_{s<=t} (1 - beta_s), float64, shape (T,)."""
    return torch.cumprod(1 - make_betas(config), dim=0)


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) (Eq. 4)."""
    ab = alpha_bar.to(x0.device, torch.float32)[t].view(-1, 1, 1, 1)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def eps_loss(model, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             alpha_bar: torch.Tensor, min_snr_gamma: float | None = None) -> torch.Tensor:
    """The simplified objective L_simple = E ||eps - eps_theta(x_t, t)||^2 (Eq. 14).

    With min_snr_gamma, each sample's squared error is weighted by min(SNR_t, gamma) / SNR_t,
    SNR_t = alpha-bar_t / (1 - alpha-bar_t): Min-SNR-gamma for epsilon prediction (Hang et al.
    2023, Eq. 10), which stops the low-noise steps from dominating the gradient.
    """
    x_t = q_sample(x0, t, noise, alpha_bar)
    error = (model(x_t, t, y).float() - noise.float()).square()
    if min_snr_gamma is None:
        return error.mean()
    snr = (alpha_bar / (1 - alpha_bar)).to(x0.device, torch.float32)[t]
    weight = snr.clamp(max=min_snr_gamma) / snr
    return (weight * error.flatten(1).mean(1)).mean()
