"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al.
2020), with classifier-free guidance (Ho & Salimans 2022).

`SampleSettings` names a sampler and its settings, and is the one home of their defaults
(the command lines read theirs from it). Both samplers are written as one update,
    x_{t_prev} = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + sigma * z,
whose per-step coefficients are precomputed once (a `SamplerPlan`), so that a step reads no
host value and branches on no tensor. Notation as in engine.diffusion: `ab` = alpha-bar.
Sampling over a subsequence t_S > ... > t_1 of the T timesteps uses the respaced variances
beta'_i = 1 - ab[t_i] / ab[t_{i-1}] (Nichol & Dhariwal 2021, section 4).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.config import DiffusionConfig
from engine.diffusion import alpha_bar as make_alpha_bar


@dataclass
class SamplerPlan:
    """Per-step coefficients, ordered by step index i = 0..S-1 (sampling runs i = S-1 -> 0)."""

    timesteps: torch.Tensor    # int64, t_i
    sqrt_ab: torch.Tensor      # sqrt(ab[t_i])
    sqrt_1m_ab: torch.Tensor   # sqrt(1 - ab[t_i])
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    coef_eps: torch.Tensor
    sigma: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> "SamplerPlan":
        return SamplerPlan(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


SAMPLERS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")
VARIANCES = ("large", "small")
DDIM_STEPS = 50  # DDIM's default number of steps; DDPM takes all T by default


@dataclass(frozen=True)
class SampleSettings:
    """A sampler and its settings. The defaults here are every tool's defaults."""

    sampler: str = "ddim"           # "ddpm" (ancestral) or "ddim"
    steps: int | None = None        # None: all T steps for DDPM, DDIM_STEPS for DDIM
    eta: float = 0.0                # DDIM only: 0 deterministic, 1 DDPM-like noise
    variance: str = "large"         # DDPM only: "large" (sigma^2 = beta) or "small" (posterior)
    spacing: str = "uniform"        # "uniform" or "quadratic"
    guidance: float = 1.8           # w in (1 + w) eps(x, c) - w eps(x, null); 0: purely conditional
    clip_x0: bool = False           # clip the predicted x_0 to [-1, 1] at each step

    def num_steps(self, num_timesteps: int) -> int:
        """The steps this sampler takes on a model with T = num_timesteps."""
        steps = self.steps or (num_timesteps if self.sampler == "ddpm" else DDIM_STEPS)
        if self.steps is not None and self.steps > num_timesteps:
            raise ValueError(f"--steps {self.steps} exceeds the model's T = {num_timesteps}")
        return min(steps, num_timesteps)

    def plan(self, diffusion: DiffusionConfig, device: torch.device | str = "cpu") -> "SamplerPlan":
        steps = self.num_steps(diffusion.num_timesteps)
        match self.sampler:
            case "ddpm":
                plan = ddpm_plan(diffusion, steps, self.variance, self.spacing)
            case "ddim":
                plan = ddim_plan(diffusion, steps, self.eta, self.spacing)
            case _:
                raise ValueError(f"unknown sampler {self.sampler!r}; use {' or '.join(SAMPLERS)}")
        return plan.to(device)


def timestep_sequence(num_timesteps: int, steps: int, spacing: str = "uniform") -> torch.Tensor:
    """S increasing timesteps from 0 to T-1: evenly spaced, or quadratic (dense near t = 0, as in DDIM)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    last = num_timesteps - 1
    if spacing == "uniform":
        seq = torch.linspace(0, last, steps, dtype=torch.float64).round().long()
    elif spacing == "quadratic":
        seq = (torch.linspace(0, last**0.5, steps, dtype=torch.float64) ** 2).round().long()
        for i in range(1, steps):  # keep the sequence strictly increasing where squares collide near 0
            seq[i] = max(seq[i], seq[i - 1] + 1)
        seq = torch.minimum(seq, torch.arange(last - steps + 1, last + 1))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use uniform or quadratic")
    if steps == 1:
        seq = torch.tensor([last])
    return seq


def _plan(timesteps: torch.Tensor, ab_all: torch.Tensor, coefs) -> SamplerPlan:
    ab = ab_all[timesteps]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # ab at t_{i-1}; 1 after the last step
    coef_x0, coef_xt, coef_eps, sigma = coefs(ab, ab_prev)
    as32 = lambda v: v.to(torch.float32)
    return SamplerPlan(timesteps.long(), as32(ab.sqrt()), as32((1 - ab).sqrt()),
                       as32(coef_x0), as32(coef_xt), as32(coef_eps), as32(sigma))


def ddpm_plan(diffusion: DiffusionConfig, steps: int | None = None, variance: str = "large",
              spacing: str = "uniform") -> SamplerPlan:
    """Ancestral sampling, p(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), sigma_t^2 I).

    variance "large": sigma_t^2 = beta_t (the report's choice); "small": the posterior
    variance beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (Ho et al. 2020, section 3.2).
    """
    if variance not in ("large", "small"):
        raise ValueError(f"unknown variance {variance!r}; use large or small")
    T = diffusion.num_timesteps

    def coefs(ab, ab_prev):
        beta = 1 - ab / ab_prev
        # Posterior mean mu~_t (Eq. 7): sqrt(ab_{t-1}) beta_t / (1 - ab_t) x0 + sqrt(alpha_t) (1 - ab_{t-1}) / (1 - ab_t) x_t.
        coef_x0 = ab_prev.sqrt() * beta / (1 - ab)
        coef_xt = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab)
        var = beta if variance == "large" else beta * (1 - ab_prev) / (1 - ab)
        var[0] = 0.0  # Algorithm 2: no noise is added at the last step (t = 1)
        return coef_x0, coef_xt, torch.zeros_like(ab), var.sqrt()

    return _plan(timestep_sequence(T, steps or T, spacing), make_alpha_bar(diffusion), coefs)


def ddim_plan(diffusion: DiffusionConfig, steps: int = 50, eta: float = 0.0,
              spacing: str = "uniform") -> SamplerPlan:
    """DDIM (Song et al. 2020, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM with the posterior variance."""
    if eta < 0:
        raise ValueError("eta must be non-negative")

    def coefs(ab, ab_prev):
        # Eq. 16: sigma_t(eta) = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}).
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        # Eq. 12: sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat + sigma_t z.
        coef_eps = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        return ab_prev.sqrt(), torch.zeros_like(ab), coef_eps, sigma

    return _plan(timestep_sequence(diffusion.num_timesteps, steps, spacing), make_alpha_bar(diffusion), coefs)


def step(plan: SamplerPlan, i: int, x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor,
         clip_x0: bool = False) -> torch.Tensor:
    """One update x_{t_i} -> x_{t_{i-1}}; coefficients come from the plan, nothing from the host."""
    sqrt_ab, sqrt_1m_ab = plan.sqrt_ab[i], plan.sqrt_1m_ab[i]
    # Eq. 15 (Ho et al.) / Eq. 9 (Song et al.): x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).
    x0 = (x - sqrt_1m_ab * eps) / sqrt_ab
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - sqrt_ab * x0) / sqrt_1m_ab
    return plan.coef_x0[i] * x0 + plan.coef_xt[i] * x + plan.coef_eps[i] * eps + plan.sigma[i] * z
