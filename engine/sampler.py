"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2020)
and DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), with classifier-free
guidance (Ho & Salimans 2022) applied to eps before any of them sees it.

`engine.settings.SampleSettings` names a sampler and its settings and builds its plan. All
samplers are written as one update,
    x_{t_prev} = c_x0 * x0_hat + c_xt * x_t + c_eps * eps_hat + c_prev * x0_hat_prev + sigma * z,
whose per-step coefficients are precomputed once (a `SamplerPlan`), so that a step reads no
host value and branches on no tensor; x0_hat_prev (the previous step's x0_hat) is what makes
DPM-Solver++(2M) second order, and is 0-weighted for the others. Notation as in
engine.diffusion: `ab` = alpha-bar; alpha_t = sqrt(ab), sigma_t = sqrt(1 - ab) and
lambda_t = log(alpha_t / sigma_t) (half the log-SNR) as in DPM-Solver. Sampling over a
subsequence t_S > ... > t_1 of the T timesteps uses the respaced variances
beta'_i = 1 - ab[t_i] / ab[t_{i-1}] (Nichol & Dhariwal 2021, section 4). After the smallest
timestep every sampler steps to the clean image (ab = 1).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from engine.config import DiffusionConfig
from engine.diffusion import alpha_bar as make_alpha_bar
from engine.errors import ConfigError


@dataclass
class SamplerPlan:
    """Per-step coefficients, ordered by step index i = 0..S-1 (sampling runs i = S-1 -> 0)."""

    timesteps: torch.Tensor    # int64, t_i
    sqrt_ab: torch.Tensor      # sqrt(ab[t_i])
    sqrt_1m_ab: torch.Tensor   # sqrt(1 - ab[t_i])
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor
    coef_eps: torch.Tensor
    coef_prev_x0: torch.Tensor  # weight of the previous step's x0_hat (DPM-Solver++(2M) only)
    sigma: torch.Tensor

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def to(self, device: torch.device | str) -> "SamplerPlan":
        return SamplerPlan(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SPACINGS = ("linspace-t0", "linspace", "leading", "trailing", "quadratic")
VARIANCES = ("large", "small")
def timestep_sequence(num_timesteps: int, steps: int, spacing: str = "linspace") -> torch.Tensor:
    """S increasing timesteps in [0, T - 1] where the model is evaluated; named as in diffusers'
    DDPMScheduler and DDIMScheduler (DPM-Solver++ takes its scheduler's grids: solver_timesteps).

    linspace   round(linspace(0, T - 1, S)): both ends (diffusers' DDIM "linspace"; Nichol &
               Dhariwal 2021's even respacing); linspace-t0 is the same grid under the name that
               means it for every sampler (the default)
    leading    0, T // S, 2 (T // S), ...: the DDIM paper's `range(0, T, T // S)` (diffusers'
               "leading" without an offset); it never evaluates t = T - 1
    trailing   round(T - k T / S) - 1 for k = S-1..0: ends at T - 1 (diffusers' "trailing", Lin et al.
               2024, "Common diffusion noise schedules and sample steps are flawed")
    quadratic  int(linspace(0, sqrt(0.8 T), S)^2): the DDIM paper's quadratic sequence (dense near
               t = 0, ending at 0.8 T), kept strictly increasing where squares collide near 0
    """
    if not 1 <= steps <= num_timesteps:
        raise ConfigError(f"steps must be in [1, {num_timesteps}], got {steps}")
    T = num_timesteps
    match spacing:
        case "linspace" | "linspace-t0":
            seq = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long()
            if steps == 1:
                seq = torch.tensor([T - 1])
        case "leading":
            seq = torch.arange(steps) * (T // steps)
        case "trailing":
            seq = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round().long() - 1).flip(0)[-steps:]
        case "quadratic":
            seq = (torch.linspace(0, (0.8 * T) ** 0.5, steps, dtype=torch.float64) ** 2).floor().long()
            for i in range(1, steps):
                seq[i] = max(seq[i], seq[i - 1] + 1)
            seq = torch.minimum(seq, torch.arange(T - steps, T))
        case _:
            raise ConfigError(f"unknown spacing {spacing!r}; use {', '.join(SPACINGS)}")
    return seq


def solver_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> torch.Tensor:
    """The S increasing timesteps where DPM-Solver++ evaluates the model, as diffusers'
    DPMSolverMultistepScheduler (which then steps from the smallest to the clean image): its
    linspace and leading take S + 1 points and drop t = 0, so no model evaluation is spent at t = 0
    (unlike DDIM's grids of the same names, timestep_sequence); linspace-t0 (DDIM's linspace, the
    default: it scored the better FID on the bundled model, docs/sampling.md), trailing and quadratic
    are shared.

    linspace   round(linspace(0, T - 1, S + 1))[1:]
    leading    k (T // (S + 1)) for k = 1..S
    """
    T = num_timesteps
    if not 1 <= steps <= T:
        raise ConfigError(f"steps must be in [1, {T}], got {steps}")
    match spacing:
        case "linspace":
            seq = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().long()[1:]
        case "leading":
            seq = torch.arange(1, steps + 1) * (T // (steps + 1))
        case _:
            return timestep_sequence(T, steps, spacing)
    # Strictly increasing and within [1, T - 1] where S comes close to T (rounding collides; a leading
    # ratio of 0): the grid diffusers cannot take either.
    for i in range(steps):
        seq[i] = max(seq[i], seq[i - 1] + 1 if i else 1)
    return torch.minimum(seq, torch.arange(T - steps, T))


def _plan(timesteps: torch.Tensor, ab_all: torch.Tensor, coefs) -> SamplerPlan:
    ab = ab_all[timesteps]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # ab at t_{i-1}; 1 after the last step
    coef_x0, coef_xt, coef_eps, sigma = coefs(ab, ab_prev)
    return _plan_of(timesteps, ab, coef_x0, coef_xt, coef_eps, torch.zeros_like(ab), sigma)


def _plan_of(timesteps, ab, coef_x0, coef_xt, coef_eps, coef_prev_x0, sigma) -> SamplerPlan:
    as32 = lambda v: v.to(torch.float32)
    return SamplerPlan(timesteps.long(), as32(ab.sqrt()), as32((1 - ab).sqrt()), as32(coef_x0), as32(coef_xt),
                       as32(coef_eps), as32(coef_prev_x0), as32(sigma))


def ddpm_plan(diffusion: DiffusionConfig, steps: int | None = None, variance: str = "large",
              spacing: str = "linspace") -> SamplerPlan:
    """Ancestral sampling, p(x_{t-1} | x_t) = N(mu~_t(x_t, x0_hat), sigma_t^2 I).

    variance "large": sigma_t^2 = beta_t (the report's choice); "small": the posterior
    variance beta~_t = (1 - ab_{t-1}) / (1 - ab_t) beta_t (Ho et al. 2020, section 3.2).
    """
    if variance not in ("large", "small"):
        raise ConfigError(f"unknown variance {variance!r}; use large or small")
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
              spacing: str = "linspace") -> SamplerPlan:
    """DDIM (Song et al. 2020, Eq. 12); eta = 0 is deterministic, eta = 1 is DDPM with the posterior variance."""
    if eta < 0:
        raise ConfigError("eta must be non-negative")

    def coefs(ab, ab_prev):
        # Eq. 16: sigma_t(eta) = eta sqrt((1 - ab_{t-1}) / (1 - ab_t)) sqrt(1 - ab_t / ab_{t-1}).
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
        # Eq. 12: sqrt(ab_{t-1}) x0_hat + sqrt(1 - ab_{t-1} - sigma_t^2) eps_hat + sigma_t z.
        coef_eps = (1 - ab_prev - sigma**2).clamp(min=0).sqrt()
        return ab_prev.sqrt(), torch.zeros_like(ab), coef_eps, sigma

    return _plan(timestep_sequence(diffusion.num_timesteps, steps, spacing), make_alpha_bar(diffusion), coefs)


def dpm_solver_plan(diffusion: DiffusionConfig, steps: int, spacing: str = "linspace-t0") -> SamplerPlan:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2: multistep, second order, data prediction), the
    deterministic (ODE) sampler, on diffusers' DPMSolverMultistepScheduler grids (solver_timesteps);
    the first step, and the last one into the clean image, are first order (as that scheduler with
    final_sigmas_type "zero").

    The default grid is `linspace-t0` (DDIM's linspace: the last model call at t = 0), not that
    scheduler's `linspace` (S + 1 points, t = 0 dropped), by FID on the bundled model (docs/sampling.md
    has the table)."""
    timesteps = solver_timesteps(diffusion.num_timesteps, steps, spacing)
    ab_all = make_alpha_bar(diffusion)
    ab = ab_all[timesteps]
    ab_prev = torch.cat([torch.ones(1, dtype=ab.dtype), ab[:-1]])  # the step's target; 1 after the last
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    alpha_to, sigma_to = ab_prev.sqrt(), (1 - ab_prev).sqrt()
    # h_i = lambda_{t_{i-1}} - lambda_{t_i}; exp(-h_i) = (sigma_to / alpha_to) / (sigma / alpha), 0 into the clean image.
    exp_neg_h = sigma_to * alpha / (alpha_to * sigma)
    first = alpha_to * (1 - exp_neg_h)  # first order (DDIM in lambda): x_to = sigma_to / sigma x - alpha_to (e^-h - 1) x0
    coef_x0, coef_prev = first.clone(), torch.zeros_like(ab)
    # Second order where the previous step exists and the target is not the clean image:
    # D = (1 + 1 / (2 r)) x0_i - 1 / (2 r) x0_{i+1}, r = h_{i+1} / h_i (Algorithm 2, line 5).
    lam = (alpha / sigma).log()
    for i in range(1, len(timesteps) - 1):
        h, h_before = (alpha_to[i] / sigma_to[i]).log() - lam[i], lam[i] - lam[i + 1]
        r = h_before / h
        coef_x0[i] = first[i] * (1 + 1 / (2 * r))
        coef_prev[i] = -first[i] / (2 * r)
    zeros = torch.zeros_like(ab)
    return _plan_of(timesteps, ab, coef_x0, sigma_to / sigma, zeros, coef_prev, zeros)


def update(plan: SamplerPlan, i: int | torch.Tensor, x: torch.Tensor, eps: torch.Tensor, z: torch.Tensor,
           x0_prev: torch.Tensor, clip_x0: bool | torch.Tensor = False,
           threshold: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One update x_{t_i} -> x_{t_{i-1}}; returns (x_{t_{i-1}}, x0_hat) (the next step's x0_prev).
    Coefficients come from the plan, nothing from the host: `i` is a step index, or a tensor of
    per-row entries of a plan whose coefficients are shaped (N, 1, 1, 1) (engine.core.PlanTable).
    clip_x0 and threshold bound x0_hat (bound_x0): a value for every row, or a tensor, one per row."""
    sqrt_ab, sqrt_1m_ab = plan.sqrt_ab[i], plan.sqrt_1m_ab[i]
    # Eq. 15 (Ho et al.) / Eq. 9 (Song et al.): x0_hat = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t).
    x0 = (x - sqrt_1m_ab * eps) / sqrt_ab
    bounded, rows = bound_x0(x0, clip_x0, threshold)
    if bounded is not x0:
        implied_eps = (x - sqrt_ab * bounded) / sqrt_1m_ab  # the eps that the bounded x0_hat implies
        x0, eps = bounded, implied_eps if rows is None else torch.where(rows, implied_eps, eps)
    x_next = (plan.coef_x0[i] * x0 + plan.coef_xt[i] * x + plan.coef_eps[i] * eps + plan.coef_prev_x0[i] * x0_prev
              + plan.sigma[i] * z)
    return x_next, x0


def bound_x0(x0: torch.Tensor, clip_x0: bool | torch.Tensor, threshold: float | torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0_hat with its range bounded image by image, which rows were: None for all); `x0` itself
    when no row bounds it, and rows not bounded keep their values exactly.

    threshold   p > 0: dynamic thresholding (Saharia et al. 2022, section 2.3): s = max(1, the p-quantile
                of |x0_hat| over the image), then x0_hat -> clamp(x0_hat, -s, s) / s, which keeps
                saturated pixels off the rails at high guidance; p = 0: off
    clip_x0     clip to [-1, 1] (s = 1): static clipping, asked for, overrides thresholding
    Each is a value for every row, or an (N, 1, 1, 1) tensor, one per row."""
    per_row = isinstance(threshold, torch.Tensor)
    if clip_x0 is False and not per_row and threshold <= 0:
        return x0, None
    if clip_x0 is True or not (per_row or threshold > 0):
        s = torch.ones_like(x0[:, :1, :1, :1])
    else:
        p = threshold if per_row else torch.full_like(x0[:, :1, :1, :1], threshold)
        s = torch.where(p > 0, row_quantile(x0.abs(), p).clamp(min=1), 1.0)
        if isinstance(clip_x0, torch.Tensor):
            s = torch.where(clip_x0, 1.0, s)
    bounded = torch.minimum(torch.maximum(x0, -s), s) / s
    if not per_row and (clip_x0 is True or threshold > 0):
        return bounded, None
    rows = (threshold > 0 if per_row else torch.zeros_like(s, dtype=torch.bool)) | clip_x0
    return torch.where(rows, bounded, x0), rows


def row_quantile(a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The p[r]-quantile of the values of image r, linearly interpolated (as torch.quantile), (N, 1, 1, 1)."""
    values = a.flatten(1).sort(dim=1).values
    position = p.view(-1, 1) * (values.shape[1] - 1)
    below = position.floor().long()
    above = (below + 1).clamp(max=values.shape[1] - 1)
    low, high = values.gather(1, below), values.gather(1, above)
    return (low + (position - below) * (high - low)).view(-1, 1, 1, 1)

