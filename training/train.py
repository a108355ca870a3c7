"""The training loop: the report's recipe (Eq. 6 warm-up, classifier-free guidance by label
dropping), EMA, atomic checkpoints with exact resume, and DistributedDataParallel.

Reproducibility: every random draw of step s is made from the default generator reseeded
with (seed, s), for the GLOBAL batch, identically on every rank; each rank then takes its
own slice. So the run is a pure function of (seed, step): resuming needs no RNG state,
and K processes compute what one process computes on the same global batch. The data
order of epoch e is a permutation seeded with (seed, e); sample g of the run (counting
from 0 over all steps) is image perm_e[g mod N] of epoch e = g // N, so an epoch's
images are split between the ranks and a batch may straddle two epochs.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn
from tqdm import tqdm

from engine import distributed, fid
from engine.backends import build_engine, native_cpu_bf16
from engine.checkpoint import Checkpoint, atomic_write, expected_shapes, load_checkpoint, save_checkpoint
from engine.clitools import at_least_one, below_one, int_range, non_negative_float, positive_float, unit_float
from engine.config import PRESETS, DiffusionConfig, ModelConfig
from engine.core import Engine
from engine.diffusion import alpha_bar as make_alpha_bar
from engine.diffusion import eps_loss
from engine.distributed import World
from engine.errors import ConfigError
from engine.generate import generate
from engine.images import check_writable, class_rows, grid
from engine.model import UNet, swap_modules
from engine.sampler import SampleSettings
from training.data import DATASETS, Dataset, load_dataset
from training.state import STATE_FILE, StateError, load_state, read_train_config, save_state

LOG_COLUMNS = ("step", "epoch", "lr", "loss", "grad_norm", "ema_decay", "images_per_s", "fid")
SAMPLES_PER_CLASS = 4
GRID_BUDGET = 0.1  # the end-of-run grid is skipped when it would cost more than this share of the run
DEFAULT_EPOCHS = 200  # the report's run length when neither --steps nor --epochs is given


@dataclass(frozen=True)
class TrainConfig:
    preset: str
    dataset: str
    out: str
    data_dir: str | None = None
    steps: int | None = None            # total optimizer steps; or
    epochs: float | None = None         # total passes over the data (fractional allowed)
    batch_size: int = 128               # global batch, split between the processes
    lr: float = 1e-4                    # base_lr of Eq. 6
    warmup_multiplier: float = 2.0      # the peak rate is base_lr * multiplier
    warmup_epochs: float | None = None  # None: a tenth of the run
    lr_schedule: str = "cosine"         # after the warm-up: "constant" or "cosine" (to 0 at the end)
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    p_uncond: float = 0.1               # probability of replacing a label by the null class
    ema_decay: float = 0.9999
    min_snr_gamma: float | None = None  # None: plain L_simple; else Min-SNR-gamma loss weights
    dropout: float | None = None        # None: the preset's
    init_from: str | None = None        # a checkpoint whose weights start the model and its EMA
    seed: int = 0
    checkpoint_every: int = 1000
    sample_every: int = 5000            # 0: no sample grids
    sample_steps: int = 20              # steps of the sample grids and FID evaluations
    sample_sampler: str = "ddim"        # their sampler: "ddim" or "dpm++2m"
    log_every: int = 10
    fid_every: int = 0                  # steps between FID evaluations of the EMA model, 0 for none
    fid_samples: int = 1000             # images sampled (class-balanced, the run's seed) per evaluation
    fid_ref: str | None = None          # reference statistics (ddpm-engine fid-ref) for --fid-every
    time_limit: float | None = None     # minutes: stop (with a checkpoint) once this much wall time has passed
    device: str = "auto"
    precision: str = "auto"            # "auto" (see autocast_bf16), "fp32" or "bf16"
    compile: bool = False
    progress: bool = True
    resume: bool = False


# The fields that define a run: a resumed run must keep them.
HYPERPARAMETERS = ("preset", "dataset", "batch_size", "lr", "warmup_multiplier", "warmup_epochs", "lr_schedule",
                   "weight_decay", "grad_clip", "p_uncond", "ema_decay", "min_snr_gamma", "dropout", "seed")
# What --resume takes from the saved run unless given again: the hyper-parameters, where the data
# is, and how the run checkpoints, logs, samples and scores. Not kept: the length (kept unless
# --steps/--epochs is given), --device, --compile, --time-limit and the progress bar, which
# belong to one invocation.
KEPT_ON_RESUME = HYPERPARAMETERS + ("data_dir", "checkpoint_every", "log_every", "sample_every", "sample_steps", "sample_sampler",
                                    "fid_every", "fid_samples", "fid_ref", "precision")

# The one definition of each numeric field's type and range: ddpm-train parses its flags with
# these, and check_config applies them to every TrainConfig (from flags, code or a state file).
FIELD_TYPES = {
    "steps": int_range(0), "epochs": non_negative_float, "batch_size": int_range(1),
    "seed": int_range(0, 2**32 - 1), "lr": positive_float, "warmup_multiplier": at_least_one,
    "warmup_epochs": non_negative_float, "weight_decay": non_negative_float, "grad_clip": positive_float,
    "p_uncond": unit_float, "ema_decay": below_one, "dropout": below_one, "min_snr_gamma": positive_float,
    "checkpoint_every": int_range(1), "sample_every": int_range(0), "sample_steps": int_range(1),
    "log_every": int_range(1), "fid_every": int_range(0), "fid_samples": int_range(2), "time_limit": positive_float,
}
CHOICES = {"preset": tuple(PRESETS), "dataset": DATASETS, "lr_schedule": ("constant", "cosine"),
           "precision": ("auto", "fp32", "bf16"), "sample_sampler": ("ddim", "dpm++2m")}
OPTIONAL = ("steps", "epochs", "warmup_epochs", "dropout", "min_snr_gamma", "time_limit", "data_dir", "init_from",
            "fid_ref")


# ---- the recipe's arithmetic -----------------------------------------------------------

def get_lr(epoch: float, config: TrainConfig, total_epochs: float) -> float:
    """Learning rate at a fractional epoch (step / steps_per_epoch)."""
    base, multiplier, warm = config.lr, config.warmup_multiplier, config.warmup_epochs
    if warm and epoch <= warm:
        if multiplier == 1:
            return base * epoch / warm  # plain linear warm-up from 0 (Ho et al. 2020)
        return base * ((multiplier - 1) * epoch / warm + 1)  # the report's Eq. 6
    peak = base * multiplier
    if config.lr_schedule == "constant":
        return peak
    # Cosine decay from the peak at the end of the warm-up to 0 at the end of the run.
    progress = min((epoch - (warm or 0)) / max(total_epochs - (warm or 0), 1e-12), 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay_at(step: int, decay: float) -> float:
    """The EMA decay after `step` updates, warmed up so short runs are not dominated by the init."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, beta: float) -> None:
    # p_ema <- p_net.lerp(p_ema, beta) = beta p_ema + (1 - beta) p_net, in float32 (EDM).
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - beta)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


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


# ---- processes and devices -------------------------------------------------------------

class OtherRankFailed(Exception):
    """This process is fine but another one failed (and reports why)."""


def all_ranks_ok(procs: World, error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, so that none waits forever in a collective.

    The failure is reported by rank 0 if it failed, else by the ranks that did; the others
    raise OtherRankFailed.
    """
    if procs.size > 1:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces only GPU tensors
        failed = torch.zeros(procs.size, dtype=torch.int32, device=device)
        failed[procs.rank] = error is not None
        dist.all_reduce(failed)
        if failed.any() and (error is None or (failed[0] and not procs.is_main)):
            error = OtherRankFailed()
    if error is not None:
        raise error


# ---- the run ---------------------------------------------------------------------------

@dataclass
class Run:
    """Everything train() sets up before the loop."""

    config: TrainConfig
    model_config: ModelConfig
    dataset: Dataset
    total_steps: int
    start_step: int
    saved: object | None  # a TrainingState when resuming
    init_weights: dict | None = None  # --init-from's weights, for a new run
    fid: tuple | None = None  # (Inception network, reference Stats) on rank 0 with --fid-every


def resolve(config: TrainConfig, dataset_size: int, preset: ModelConfig) -> tuple[TrainConfig, int]:
    """Fill in the defaults that depend on the data; returns (config, total steps)."""
    if config.steps is not None:
        total = config.steps
    else:
        epochs = config.epochs if config.epochs is not None else DEFAULT_EPOCHS
        total = math.ceil(epochs * dataset_size / config.batch_size)
    total_epochs = total * config.batch_size / dataset_size
    config = dataclasses.replace(
        config, steps=total, epochs=None,
        warmup_epochs=config.warmup_epochs if config.warmup_epochs is not None else total_epochs / 10,
        dropout=config.dropout if config.dropout is not None else preset.dropout)
    return config, total


def check_config(config: TrainConfig, processes: int = 1) -> None:
    """The one check of a TrainConfig's values, whatever made it: types (an int is not 3.0 or
    true), ranges (FIELD_TYPES), choices and the rules that tie fields together."""
    problems = []
    for field in dataclasses.fields(TrainConfig):
        name, value = field.name, getattr(config, field.name)
        flag = "--" + name.replace("_", "-")
        if value is None and name in OPTIONAL:
            continue
        if name in FIELD_TYPES:
            try:
                if type(value) not in (int, float):
                    raise ValueError(f"{str(value)[:40]!r} is not a number")
                FIELD_TYPES[name](repr(value))
            except (ValueError, argparse.ArgumentTypeError) as e:
                problems.append(f"{flag} {e}")
        elif name in CHOICES:
            if value not in CHOICES[name]:
                problems.append(f"{flag} {str(value)[:40]!r} is not one of {', '.join(CHOICES[name])}")
        elif type(value) is not (bool if field.type == "bool" else str):
            problems.append(f"{flag} {str(value)[:40]!r} is not a {'flag' if field.type == 'bool' else 'string'}")
    if config.steps is not None and config.epochs is not None:
        problems.append("give --steps or --epochs, not both")
    if type(config.batch_size) is int and processes > 1 and config.batch_size % processes:
        problems.append(f"--batch-size {config.batch_size} must be a multiple of the {processes} processes")
    if config.fid_every and not config.fid_ref:
        problems.append("--fid-every needs --fid-ref STATS.npz (write one with ddpm-engine fid-ref)")
    if problems:
        raise ConfigError("; ".join(problems))


def with_defaults(train_config: dict) -> dict:
    """A saved TrainConfig with the defaults of the fields added since it was written."""
    return {f.name: f.default for f in dataclasses.fields(TrainConfig)} | train_config


def saved_config(out: Path) -> dict | None:
    """The TrainConfig saved by the run in `out` (from the state's header alone), checked like any
    other config; None when `out` holds no state."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    saved = read_train_config(path)
    unknown = set(saved) - {f.name for f in dataclasses.fields(TrainConfig)}
    missing = {"preset", "dataset"} - set(saved)
    if unknown or missing:
        what = f"unknown field {sorted(unknown)[0][:40]!r}" if unknown else f"no {sorted(missing)[0]}"
        raise StateError(f"{path}: its training config is invalid ({what})")
    try:
        check_config(TrainConfig(**with_defaults(saved)))
    except ConfigError as e:
        raise StateError(f"{path}: its training config is invalid ({e})") from None
    return saved


def check_resume(config: TrainConfig, kept: dict, start: int, dataset_size: int, is_main: bool) -> None:
    """Refuse a resumed run whose hyper-parameters differ from the saved ones; warn (one line) when
    a new length changes the learning-rate schedule still to come."""
    for key in HYPERPARAMETERS:
        if getattr(config, key) != kept[key]:
            raise StateError(f"--{key.replace('_', '-')} {getattr(config, key)} differs from the run's "
                             f"{kept[key]}; a resumed run keeps its settings")
    if config.steps != kept["steps"] and config.lr_schedule == "cosine" and is_main:
        # The warm-up is fixed in epochs; the cosine decay after it ends with the run.
        epoch = start * config.batch_size / dataset_size
        was = get_lr(epoch, config, kept["steps"] * config.batch_size / dataset_size)
        now = get_lr(epoch, config, config.steps * config.batch_size / dataset_size)
        print(f"warning: the run was {kept['steps']} steps long and is now {config.steps}: its cosine decay now "
              f"ends at the new length (learning rate at step {start}: {was:.3g} -> {now:.3g})", file=sys.stderr)


def prepare(config: TrainConfig, procs: World) -> Run:
    check_config(config, procs.size)
    out = Path(config.out)
    check_writable(out)
    preset = ModelConfig.from_name(config.preset)
    state_path = out / STATE_FILE
    saved = None
    if state_path.is_file():
        if not config.resume:
            raise ConfigError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
        saved = load_state(state_path)

    # Rank 0 loads first: it may download, which the others must not race.
    dataset, error = None, None
    if procs.is_main:
        try:
            dataset = load_dataset(config.dataset, Path(config.data_dir) if config.data_dir else None,
                                   preset.image_size, config.seed)
        except Exception as e:  # reported on every rank below
            error = e
    all_ranks_ok(procs, error)
    if not procs.is_main:
        dataset = load_dataset(config.dataset, Path(config.data_dir) if config.data_dir else None,
                               preset.image_size, config.seed)

    if config.batch_size > len(dataset):
        raise ConfigError(f"--batch-size {config.batch_size} is more than the {len(dataset)} images of the data set")
    config, total = resolve(config, len(dataset), preset)
    model_config = dataclasses.replace(preset, num_classes=dataset.num_classes, dropout=config.dropout)
    if saved is not None:
        check_resume(config, with_defaults(saved.train_config), saved.step, len(dataset), procs.is_main)
        if ModelConfig.from_json(saved.model_config) != model_config:  # fields added since: their defaults
            raise StateError(f"{state_path} was trained with a different model or dataset ({saved.model_config[:200]})")
        if saved.step > total:
            raise StateError(f"{state_path} is at step {saved.step}, past --steps {total}")
        check_saved_tensors(saved, model_config, state_path)
    start = saved.step if saved is not None else 0
    init_weights = None
    if saved is None and config.init_from is not None:
        init_weights = load_init_weights(Path(config.init_from), model_config)
    fid_tools = None
    if config.fid_every and procs.is_main:  # loaded before training, so a bad file fails at once
        fid_tools = (fid.load_network(), fid.load_stats(Path(config.fid_ref)))
    return Run(config, model_config, dataset, total, start, saved, init_weights, fid_tools)


def check_saved_tensors(saved, model_config: ModelConfig, path: Path) -> None:
    """The state's weights and Adam moments must have the shapes of the run's model (found on the
    meta device, without memory), and its weights must be finite."""
    with torch.device("meta"):
        params = list(UNet(model_config).named_parameters())
    shapes = expected_shapes(model_config)
    for part in (saved.model, saved.ema):
        if {k: tuple(v.shape) for k, v in part.items()} != shapes:
            raise StateError(f"{path}: its weights do not have the shapes of the run's model")
        if not all(torch.isfinite(v).all() for v in part.values()):
            raise StateError(f"{path}: its weights hold NaN or inf")
    for index, moments in saved.optimizer["state"].items():
        if not 0 <= index < len(params) or any(isinstance(v, torch.Tensor) and v.numel() > 1
                                               and v.shape != params[index][1].shape for v in moments.values()):
            raise StateError(f"{path}: its optimizer state does not fit the run's model")


def load_init_weights(path: Path, model_config: ModelConfig) -> dict:
    """The weights of checkpoint `path` (its EMA weights, for a model.safetensors), as float32,
    refused unless its model is the run's (preset, classes, patch size)."""
    checkpoint = load_checkpoint(path)
    ignore = {"dropout": model_config.dropout}  # dropout changes no weight
    if dataclasses.replace(checkpoint.model.config, **ignore) != model_config:
        raise ConfigError(f"--init-from {path}: its model ({checkpoint.model.config.to_json()}) is not this run's "
                         f"({model_config.to_json()})")
    return {k: v.float() for k, v in checkpoint.model.state_dict().items()}


def train(config: TrainConfig, on_step=None) -> Path:
    """Train; returns the path of model.safetensors. on_step(step) is called after each step."""
    device = distributed.resolve_device(config.device)
    procs = distributed.init(device.type)  # NCCL to train on GPUs, gloo on CPUs
    try:
        path = _train(config, procs, device, on_step)
        distributed.barrier(procs)  # leave together: gloo can abort a process whose peer is still writing
        return path
    finally:
        distributed.finish(procs)


def _train(config: TrainConfig, procs: World, device: torch.device, on_step) -> Path:
    run, error = None, None
    try:
        run = prepare(config, procs)
        device = distributed.device_for(procs, device)
    except Exception as e:
        error = e
    all_ranks_ok(procs, error)
    config, mc, total = run.config, run.model_config, run.total_steps
    out = Path(config.out)
    if procs.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        for stale in [*out.glob(".*.tmp"), *(out / "samples").glob(".*.tmp")]:  # left by a killed write
            stale.unlink(missing_ok=True)

    bf16 = autocast_bf16(config.precision, device)
    channels_last = device.type == "cuda" and bf16
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(config.seed)
    model = UNet(mc)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    use_global_batch_dropout(model, procs.rank, procs.size)
    model.to(device, memory_format=memory_format).train()
    ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    if run.saved is not None:
        model.load_state_dict(run.saved.model)
        ema.load_state_dict(run.saved.ema)
        try:
            optimizer.load_state_dict(run.saved.optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise StateError(f"{STATE_FILE} in {out}: its optimizer state does not fit the model ({str(e)[:100]})") from None
        run.saved = None  # free the host copy
    elif config.init_from is not None:
        for net_ in (model, ema):
            net_.load_state_dict(run.init_weights)
        run.init_weights = None

    net: nn.Module = model
    if procs.size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if config.compile:
        net = torch.compile(net)

    diffusion = DiffusionConfig()
    alpha_bar = make_alpha_bar(diffusion).to(device, torch.float32)
    images = run.dataset.images.to(device)  # uint8; 1/4 of float32's memory
    labels = run.dataset.labels.to(device)
    n, gb = len(images), config.batch_size
    b = gb // procs.size
    lo, hi = procs.rank * b, (procs.rank + 1) * b
    total_epochs = total * gb / n
    shape = (mc.in_channels, mc.image_size, mc.image_size)

    def train_step(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(run_seed(config.seed, STEP_DRAWS, step))
        idx = batch_indices(step, gb, n, config.seed)[lo:hi].to(device)
        # Drawn for the global batch on every rank, then sliced: the split changes nothing.
        t = torch.randint(diffusion.num_timesteps, (gb,), device=device)[lo:hi]
        noise = torch.randn((gb, *shape), device=device)[lo:hi].contiguous(memory_format=memory_format)
        drop_label = (torch.rand(gb, device=device) < config.p_uncond)[lo:hi]
        flip = (torch.rand(gb, device=device) < 0.5)[lo:hi]

        x0 = images[idx].float().div_(127.5).sub_(1)  # uint8 -> [-1, 1]
        x0 = torch.where(flip[:, None, None, None], x0.flip(3), x0).contiguous(memory_format=memory_format)
        y = torch.where(drop_label, mc.null_class, labels[idx])
        return optimize(net, model, ema, optimizer, x0, y, t, noise, alpha_bar, bf16,
                        lr=get_lr(step * gb / n, config, total_epochs), grad_clip=config.grad_clip,
                        ema_beta=ema_decay_at(step, config.ema_decay), min_snr_gamma=config.min_snr_gamma)

    log = open_log(out / "log.csv", run.start_step) if procs.is_main else None
    bar = tqdm(total=total, initial=run.start_step, unit="step", dynamic_ncols=True,
               disable=not (config.progress and procs.is_main))
    sums = torch.zeros(2, device=device)
    postfix: dict[str, str] = {}
    last_logged, last_time = run.start_step, time.perf_counter()
    deadline = last_time + 60 * config.time_limit if config.time_limit is not None else math.inf
    try:
        for step in range(run.start_step, total):
            loss, grad_norm = train_step(step)
            sums += torch.stack([loss, grad_norm])
            done = step + 1
            bar.update(1)
            # Every rank must agree on stopping, hence rank 0's clock decides.
            out_of_time = config.time_limit is not None and distributed.broadcast_flag(
                procs, time.perf_counter() > deadline)
            checkpoint = done % config.checkpoint_every == 0 or done == total or out_of_time
            fid_due = config.fid_every and done % config.fid_every == 0
            if done % config.log_every == 0 or checkpoint or fid_due:
                if procs.size > 1:
                    dist.all_reduce(sums)
                    sums /= procs.size
                mean_loss, mean_norm = (sums / (done - last_logged)).tolist()
                now = time.perf_counter()
                rate = (done - last_logged) * gb / (now - last_time)
                lr = get_lr(step * gb / n, config, total_epochs)
                score = ""
                if fid_due and procs.is_main:
                    score = f"{evaluate_fid(ema, mc, diffusion, config, device, *run.fid):.3f}"
                    postfix["fid"] = score
                row = (done, f"{done * gb / n:.4f}", f"{lr:.6g}", f"{mean_loss:.6f}", f"{mean_norm:.4f}",
                       f"{ema_decay_at(step, config.ema_decay):.6f}", f"{rate:.1f}", score)
                if log is not None:
                    log.write(",".join(map(str, row)) + "\n")
                    log.flush()
                postfix.update(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                bar.set_postfix(postfix)
                sums.zero_()
                last_logged, last_time = done, time.perf_counter()  # the next rate leaves the FID out
            if procs.is_main and checkpoint:
                save_checkpoint(out / "model.safetensors", ema, diffusion, run.dataset.class_names)
                save_state(out / STATE_FILE, done, dataclasses.asdict(config), mc.to_json(), model, ema, optimizer)
            last = (done == total or out_of_time) and grid_is_cheap(done - run.start_step, config, mc)
            if procs.is_main and config.sample_every and (done % config.sample_every == 0 or last):
                save_samples(out / "samples" / f"step-{done:07d}.png", ema, mc, diffusion, config, device)
            if on_step is not None:
                on_step(done)
            if out_of_time:
                break
        if total == run.start_step and procs.is_main and not (out / "model.safetensors").is_file():
            save_checkpoint(out / "model.safetensors", ema, diffusion, run.dataset.class_names)
    finally:
        bar.close()
        if log is not None:
            log.close()
    return out / "model.safetensors"


def autocast_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (master weights, AdamW and EMA stay float32).

    auto: on CUDA, and on CPUs with bf16 instructions, where it gives the cifar10-cpu preset 1.54x
    the images/s of fp32 (benchmarks/bench_train.py, batch 32, same run, 2026-11-29; ~62 -> ~94
    images/s in the bundled model's run, whose loss stayed in its fp32 band). Sampling stays fp32 on the CPU
    (engine.backends: guidance amplifies bf16's rounding); training's gradient noise dwarfs it."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())
    return precision == "bf16"


def optimize(net: nn.Module, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer, x0: torch.Tensor,
             y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, bf16: bool, lr: float,
             grad_clip: float, ema_beta: float, min_snr_gamma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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


def open_log(path: Path, start_step: int):
    """Open log.csv for appending, first dropping rows past the resumed step (written after
    the last checkpoint by a run that was then killed) and any half-written last line."""
    rows = []
    if start_step > 0 and path.is_file():
        with open(path, newline="") as f:
            for row in csv.reader(f):
                if len(row) == len(LOG_COLUMNS) - 1:
                    row.append("")  # a log written before the fid column
                if len(row) == len(LOG_COLUMNS) and row[0].isdigit() and int(row[0]) <= start_step:
                    rows.append(row)
    text = ",".join(LOG_COLUMNS) + "\n" + "".join(",".join(r) + "\n" for r in rows)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return open(path, "a")


def training_sampler(ema: UNet, diffusion: DiffusionConfig, config: TrainConfig,
                     device: torch.device) -> tuple[Engine, SampleSettings]:
    """What the grids and the FID evaluations sample with: the eager EMA model, --sample-sampler for
    --sample-steps and the sampler's default guidance."""
    settings = SampleSettings(sampler=config.sample_sampler, steps=min(config.sample_steps, diffusion.num_timesteps))
    return build_engine(Checkpoint(ema, diffusion, ()), "eager", device, "fp32"), settings


FID_CHUNK = 256  # images sampled, then featurised, at a time in an FID evaluation (bounded memory)


@torch.no_grad()
def evaluate_fid(ema: UNet, mc: ModelConfig, diffusion: DiffusionConfig, config: TrainConfig, device: torch.device,
                 network: fid.InceptionNetwork, reference: fid.Stats) -> float:
    """FID of config.fid_samples images of the EMA model (the grids' sampler, steps and guidance,
    class i % num_classes for image i, the run's seed) against the reference statistics."""
    classes = list(range(mc.num_classes))
    engine, settings = training_sampler(ema, diffusion, config, device)

    def batches():
        for indices in torch.arange(config.fid_samples).split(FID_CHUNK):
            images, _ = generate(engine, settings, indices, classes, seed=config.seed, progress=False)
            yield images

    stats = fid.feature_stats(network, batches(), config.fid_samples, progress=False, source="training samples")
    return fid.frechet_distance(stats, reference)


def grid_is_cheap(steps_trained: int, config: TrainConfig, mc: ModelConfig) -> bool:
    """Whether a sample grid costs at most GRID_BUDGET of `steps_trained` training steps, counting
    U-Net forwards: 2 per grid image and sampling step (guidance), about 3 per training image."""
    grid_forwards = 2 * SAMPLES_PER_CLASS * mc.num_classes * config.sample_steps
    return grid_forwards <= GRID_BUDGET * 3 * steps_trained * config.batch_size


@torch.no_grad()
def save_samples(path: Path, ema: UNet, mc: ModelConfig, diffusion: DiffusionConfig, config: TrainConfig,
                 device: torch.device) -> None:
    classes = list(range(mc.num_classes))
    engine, settings = training_sampler(ema, diffusion, config, device)
    images, labels = generate(engine, settings, torch.arange(SAMPLES_PER_CLASS * len(classes)), classes, seed=0,
                              progress=False)
    picture = Image.fromarray(grid(class_rows(images, labels, classes)))
    atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
