"""The training loop: `train(config)` runs one process's part of a run (under torchrun, with
DistributedDataParallel), from its set-up (prepare.py) to its last checkpoint.

Each step draws its global batch and takes one AdamW step with the EMA update (recipe.py, which
also says why K processes compute what one does); every --log-every steps a row of log.csv
(log.py), every --checkpoint-every steps model.safetensors and the state for --resume
(state.py), every --sample-every steps a grid and every --fid-every steps an FID (evaluate.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine import distributed
from engine.backends import native_cpu_bf16
from engine.config import DiffusionConfig
from engine.diffusion import alpha_bar as make_alpha_bar
from engine.distributed import World
from engine.formats.checkpoint import save_checkpoint
from engine.model import UNet
from training.config import TrainConfig
from training.evaluate import evaluate_fid, grid_is_cheap, save_samples
from training.log import Progress
from training.prepare import Run, all_ranks_ok, prepare
from training.recipe import ema_decay_at, get_lr, optimize, training_batch, update_ema, use_global_batch_dropout
from training.state import STATE_FILE, StateError, save_state


@dataclass
class Models:
    """What the steps update: the model, its EMA and their optimizer; `net` is the model as a step
    calls it (wrapped in DDP across processes, compiled with --compile)."""

    model: UNet
    ema: UNet
    net: nn.Module
    optimizer: torch.optim.Optimizer
    ema_long: UNet | None = None  # --ema-long-decay's EMA


@dataclass
class OnDevice:
    """What the steps read, on this process's device."""

    device: torch.device
    images: torch.Tensor  # the whole data set, uint8: 1/4 of float32's memory
    labels: torch.Tensor
    diffusion: DiffusionConfig
    alpha_bar: torch.Tensor
    bf16: bool  # the forward under bf16 autocast
    memory_format: torch.memory_format


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
    """This process's part: the set-up (a failure on any rank stops them all), then the loop."""
    run, error = None, None
    try:
        run = prepare(config, procs)
        device = distributed.device_for(procs, device)
    except Exception as e:  # noqa: BLE001 (any failure, reported on every rank)
        error = e
    all_ranks_ok(procs, error)
    if procs.is_main:
        make_run_folder(Path(run.config.out))
    bf16 = autocast_bf16(run.config.precision, device)
    memory_format = torch.channels_last if device.type == "cuda" and bf16 else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    models = build_models(run, procs, device, memory_format)
    diffusion = DiffusionConfig()
    data = OnDevice(device, run.dataset.images.to(device), run.dataset.labels.to(device), diffusion,
                    make_alpha_bar(diffusion).to(device, torch.float32), bf16, memory_format)
    return loop(run, procs, models, data, on_step)


def make_run_folder(out: Path) -> None:
    """OUT and OUT/samples, without the temporary files of a write that was killed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    for stale in [*out.glob(".*.tmp"), *(out / "samples").glob(".*.tmp")]:
        stale.unlink(missing_ok=True)


def autocast_bf16(precision: str, device: torch.device) -> bool:
    """Whether the forward runs under bf16 autocast (master weights, AdamW and EMA stay float32).

    auto: on CUDA, and on CPUs with bf16 instructions, where it trains the cifar10-cpu preset faster than
    fp32 (benchmarks/bench_train.py; benchmarks/results/2026-11-29-cpu-train-2.md), and the bundled model's
    loss stayed in its fp32 band. Sampling stays fp32 on the CPU (engine.backends: guidance amplifies
    bf16's rounding); training's gradient noise dwarfs it."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and native_cpu_bf16())
    return precision == "bf16"


def build_models(run: Run, procs: World, device: torch.device, memory_format: torch.memory_format) -> Models:
    """The model (the run's seed; global-batch dropout), its EMA and AdamW on the device, from the
    saved state when resuming or from --init-from's weights."""
    config = run.config
    torch.manual_seed(config.seed)
    model = UNet(run.model_config)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    use_global_batch_dropout(model, procs.rank, procs.size)
    model.to(device, memory_format=memory_format).train()
    ema.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")
    saved_long = run.saved.ema_long if run.saved is not None else None
    if run.saved is not None:
        model.load_state_dict(run.saved.model)
        ema.load_state_dict(run.saved.ema)
        try:
            optimizer.load_state_dict(run.saved.optimizer)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise StateError(f"{STATE_FILE} in {config.out}: its optimizer state does not fit the model "
                             f"({str(e)[:100]})") from None
        run.saved = None  # free the host copy
    elif config.init_from is not None:
        for net_ in (model, ema):
            net_.load_state_dict(run.init_weights)
        run.init_weights = None
    ema_long = None
    if config.ema_long_decay is not None:  # saved, else (a new run, or one that kept none) the first EMA's copy
        ema_long = copy.deepcopy(ema)
        if saved_long is not None:
            ema_long.load_state_dict(saved_long)

    net: nn.Module = model
    if procs.size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    if config.compile:
        net = torch.compile(net)
    return Models(model, ema, net, optimizer, ema_long)


def loop(run: Run, procs: World, models: Models, data: OnDevice, on_step) -> Path:
    """Steps from run.start_step to the end of the run (or of --time-limit), with the log rows,
    checkpoints and grids due after each."""
    config, total, out = run.config, run.total_steps, Path(run.config.out)
    progress = Progress(out / "log.csv", run.start_step, total, config.batch_size, procs, data.device,
                        bar=config.progress)
    deadline = time.perf_counter() + 60 * config.time_limit if config.time_limit is not None else math.inf
    try:
        for step in range(run.start_step, total):
            progress.step_done(*train_step(step, run, procs, models, data))
            done = step + 1
            # Every rank must agree on stopping, hence rank 0's clock decides.
            out_of_time = config.time_limit is not None and distributed.broadcast_flag(
                procs, time.perf_counter() > deadline)
            checkpoint = done % config.checkpoint_every == 0 or done == total or out_of_time
            fid_due = config.fid_every and done % config.fid_every == 0
            if done % config.log_every == 0 or checkpoint or fid_due:
                log_row(step, run, procs, models, data, progress, evaluate=fid_due and procs.is_main)
            if procs.is_main and checkpoint:
                save_checkpoints(out, done, run, models, data)
            last = (done == total or out_of_time) and grid_is_cheap(done - run.start_step, config, run.model_config)
            if procs.is_main and config.sample_every and (done % config.sample_every == 0 or last):
                save_samples(out / "samples" / f"step-{done:07d}.png", models.ema, run.model_config, data.diffusion,
                             config, data.device)
            if on_step is not None:
                on_step(done)
            if out_of_time:
                break
        if total == run.start_step and procs.is_main and not (out / "model.safetensors").is_file():
            save_checkpoint(out / "model.safetensors", models.ema, data.diffusion, run.dataset.class_names)
    finally:
        progress.close()
    return out / "model.safetensors"


def save_checkpoints(out: Path, done: int, run: Run, models: Models, data: OnDevice) -> None:
    """model.safetensors (the EMA weights), model-ema-long.safetensors with --ema-long-decay, and the
    state for --resume."""
    class_names = run.dataset.class_names
    save_checkpoint(out / "model.safetensors", models.ema, data.diffusion, class_names)
    if models.ema_long is not None:
        save_checkpoint(out / "model-ema-long.safetensors", models.ema_long, data.diffusion, class_names)
    save_state(out / STATE_FILE, done, dataclasses.asdict(run.config), run.model_config.to_json(), models.model,
               models.ema, models.optimizer, models.ema_long)


def train_step(step: int, run: Run, procs: World, models: Models, data: OnDevice) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on this process's part of the global batch of `step`; returns (loss,
    gradient norm) as device tensors."""
    config = run.config
    x0, y, t, noise = training_batch(step, config, data.images, data.labels, run.model_config.null_class,
                                     data.diffusion.num_timesteps, procs.rank, procs.size, data.memory_format)
    loss, grad_norm = optimize(
        models.net, models.model, models.ema, models.optimizer, x0, y, t, noise, data.alpha_bar, data.bf16,
        lr=get_lr(run.epoch(step), config, run.epoch(run.total_steps), step), grad_clip=config.grad_clip,
        ema_beta=ema_decay_at(step, config.ema_decay, config.ema_warmup), min_snr_gamma=config.min_snr_gamma)
    if models.ema_long is not None:
        update_ema(models.ema_long, models.model, ema_decay_at(step, config.ema_long_decay, config.ema_warmup))
    return loss, grad_norm


def log_row(step: int, run: Run, procs: World, models: Models, data: OnDevice, progress: Progress,
            evaluate: bool) -> None:
    """The row of log.csv after `step`: the means since the last row, and with `evaluate` the EMA
    model's FID (left out of the rate)."""
    config, done = run.config, step + 1
    loss, grad_norm, images_per_s = progress.means(done)
    score = ""
    if evaluate:
        score = f"{evaluate_fid(models.ema, run.model_config, data.diffusion, config, data.device, *run.fid):.3f}"
    progress.write(done, run.epoch(done), get_lr(run.epoch(step), config, run.epoch(run.total_steps), step), loss, grad_norm,
                   ema_decay_at(step, config.ema_decay, config.ema_warmup), images_per_s, score)
