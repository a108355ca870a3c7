"""The report's recipe as plain functions: the Eq. 6 warm-up and the decay after it (or a cooldown
from a chosen step), the EMA, the data order, each step's random draws (classifier-free guidance by
label dropping, flips, timesteps, noise, dropout masks) and the optimisation step.

Reproducibility: every random draw of step s is made from the default generator reseeded
with (seed, s), for the GLOBAL batch, identically on every rank; each rank then takes its
own slice. So the run is a pure function of (seed, step): resuming needs no RNG state,
and K processes compute what one process computes on the same global batch. The data
order of epoch e is a permutation seeded with (seed, e); sample g of the run (counting
from 0 over all steps) is image perm_e[g mod N] of epoch e = g // N, so an epoch's
images are split between the ranks and a batch may straddle two epochs.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from engine.diffusion import eps_loss
from engine.model import swap_modules
from training.config import TrainConfig


def get_lr(epoch: float, config: TrainConfig, total_epochs: float, step: int | None = None) -> float:
    """Learning rate at a fractional epoch (step / steps_per_epoch) of a run of `total_epochs`; a
    cooldown also needs the step itself (its decay is counted in steps)."""
    warm = config.warmup_epochs or 0
    if config.lr_schedule == "cooldown":
        if step is None:
            raise ValueError("a cooldown's rate depends on the step: pass step")
        # Warmup-stable-decay: the constant schedule's rate, times a decay counted in steps.
        return constant_lr(epoch, config) * cooldown_factor(step, config)
    if config.lr_schedule == "constant" or epoch <= warm:
        return constant_lr(epoch, config)
    # Cosine decay from the peak at the end of the warm-up to 0 at the end of the run.
    peak = config.lr * config.warmup_multiplier
    progress = min((epoch - warm) / max(total_epochs - warm, 1e-12), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def constant_lr(epoch: float, config: TrainConfig) -> float:
    """The warm-up's rate, then its peak base_lr * multiplier."""
    base, multiplier, warm = config.lr, config.warmup_multiplier, config.warmup_epochs
    if warm and epoch <= warm:
        if multiplier == 1:
            return base * epoch / warm  # plain linear warm-up from 0 (Ho et al. 2020)
        return base * ((multiplier - 1) * epoch / warm + 1)  # the report's Eq. 6
    return base * multiplier


def cooldown_factor(step: int, config: TrainConfig) -> float:
    """The cooldown's decay of the rate at `step`: 1 until cooldown_start, then down to 0 over
    cooldown_steps, as 1 - p or 1 - sqrt(p) of the progress p (Hägele et al. 2024)."""
    progress = min(max(step - config.cooldown_start, 0) / config.cooldown_steps, 1.0)
    if config.cooldown_shape == "linear":
        return 1 - progress
    return 1 - math.sqrt(progress)


def ema_decay_at(step: int, decay: float, warmup: bool = True) -> float:
    """The EMA decay after `step` updates, warmed up so short runs are not dominated by the random
    init. Without `warmup` (an EMA that starts from trained weights) the decay itself."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    # p_ema <- p_net.lerp(p_ema, beta) = beta p_ema + (1 - beta) p_net, in float32 (EDM).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


# ---- the random draws ------------------------------------------------------------------

def run_seed(seed: int, purpose: int, counter: int) -> int:
    """An independent 63-bit seed for (run seed, purpose, step or epoch)."""
    return int(np.random.SeedSequence([seed, purpose, counter]).generate_state(1, np.uint64)[0]) >> 1


STEP_DRAWS, EPOCH_ORDER = 0, 1


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(run_seed(seed, EPOCH_ORDER, epoch)))


def batch_indices(step: int, global_batch: int, n: int, seed: int) -> torch.Tensor:
    """Dataset indices of the global batch of `step` (see the module docstring)."""
    g = step * global_batch + torch.arange(global_batch)
    epochs, positions = g // n, g % n
    indices = torch.empty_like(g)
    for e in epochs.unique().tolist():
        here = epochs == e
        indices[here] = epoch_order(seed, e, n)[positions[here]]
    return indices


def training_batch(step: int, config: TrainConfig, images: torch.Tensor, labels: torch.Tensor, null_class: int,
                   num_timesteps: int, rank: int, world_size: int,
                   memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This process's part of the global batch of `step`: (x0, y, t, noise), from the uint8 data set
    `images` and its `labels` on the device. Each image is flipped left-right with probability 1/2
    and its label replaced by the null class with probability config.p_uncond."""
    gb, device = config.batch_size, images.device
    b = gb // world_size
    lo, hi = rank * b, (rank + 1) * b
    torch.manual_seed(run_seed(config.seed, STEP_DRAWS, step))
    idx = batch_indices(step, gb, len(images), config.seed)[lo:hi].to(device)
    # Drawn for the global batch on every rank, then sliced: the split changes nothing.
    t = torch.randint(num_timesteps, (gb,), device=device)[lo:hi]
    noise = torch.randn((gb, *images.shape[1:]), device=device)[lo:hi].contiguous(memory_format=memory_format)
    drop_label = (torch.rand(gb, device=device) < config.p_uncond)[lo:hi]
    flip = (torch.rand(gb, device=device) < 0.5)[lo:hi]

    x0 = images[idx].float().div_(127.5).sub_(1)  # uint8 -> [-1, 1]
    x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0).contiguous(memory_format=memory_format)
    y = torch.where(drop_label, null_class, labels[idx])
    return x0, y, t, noise


class GlobalBatchDropout(nn.Module):
    """nn.Dropout whose mask is drawn for the global batch and sliced to this rank's part,
    so that the masks of sample i do not depend on how the batch is split between processes."""

    def __init__(self, p: float, rank: int, world_size: int):
        super().__init__()
        self.p, self.rank, self.world_size = p, rank, world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        n = len(x)
        u = torch.rand((n * self.world_size, *x.shape[1:]), device=x.device)[self.rank * n:(self.rank + 1) * n]
        return x * ((u >= self.p).to(x.dtype) * (1 / (1 - self.p)))


def use_global_batch_dropout(model: nn.Module, rank: int, world_size: int) -> None:
    swap_modules(model, {nn.Dropout: lambda dropout: GlobalBatchDropout(dropout.p, rank, world_size)})


# ---- the optimisation step -------------------------------------------------------------

def optimize(net: nn.Module, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
             y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, bf16: bool, lr: float,
             grad_clip: float, ema_beta: float,
             min_snr_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One AdamW step on L_simple, then the EMA update; `net` is `model` or its DDP/compiled wrapper.

    Returns (loss, gradient norm before clipping) as device tensors: no host sync here.
    """
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = eps_loss(net, x0, y, t, noise, alpha_bar, min_snr_gamma)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    update_ema(ema, model, ema_beta)
    return loss.detach(), grad_norm.detach()
