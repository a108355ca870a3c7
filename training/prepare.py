"""Everything a run sets up before its first step, and refuses before it writes anything: the
config checked, the data loaded, a resumed run's state checked against the run, --init-from's
weights and the FID tools loaded. A failure on any process stops every process (all_ranks_ok)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import ModelConfig
from engine.distributed import World
from engine.errors import ConfigError
from engine.evaluation import fid
from engine.formats.checkpoint import expected_shapes, load_checkpoint
from engine.formats.images import check_writable
from engine.model import UNet
from training.config import COOLDOWN_FIELDS, HYPERPARAMETERS, TrainConfig, check_config, resolve, with_defaults
from training.data import Dataset, load_dataset
from training.recipe import get_lr
from training.state import STATE_FILE, StateError, TrainingState, load_state


@dataclass
class Run:
    """Everything train() sets up before the loop."""

    config: TrainConfig  # resolved: its steps, warm-up and dropout filled in
    model_config: ModelConfig
    dataset: Dataset
    total_steps: int
    start_step: int
    saved: TrainingState | None  # when resuming
    init_weights: dict | None = None  # --init-from's weights, for a new run
    fid: tuple | None = None  # (Inception network, reference Stats) on rank 0 with --fid-every

    def epoch(self, step: int) -> float:
        """The (fractional) epoch reached after `step` steps."""
        return step * self.config.batch_size / len(self.dataset)


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
    dataset = load_data(config, preset, procs)
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


def load_data(config: TrainConfig, preset: ModelConfig, procs: World) -> Dataset:
    """The data set at the preset's image size; rank 0 loads first: it may download, which the
    others must not race."""
    data_dir = Path(config.data_dir) if config.data_dir else None
    dataset, error = None, None
    if procs.is_main:
        try:
            dataset = load_dataset(config.dataset, data_dir, preset.image_size, config.seed)
        except Exception as e:  # noqa: BLE001 (any failure, reported on every rank below)
            error = e
    all_ranks_ok(procs, error)
    if not procs.is_main:
        dataset = load_dataset(config.dataset, data_dir, preset.image_size, config.seed)
    return dataset


def check_resume(config: TrainConfig, kept: dict, start: int, dataset_size: int, is_main: bool) -> None:
    """Refuse a resumed run whose hyper-parameters differ from the saved ones, except a constant-rate
    run resumed as a cooldown (a branch, in a copy of its folder); warn (one line) when a new length
    changes the learning-rate schedule still to come."""
    branch = kept["lr_schedule"] == "constant" and config.lr_schedule == "cooldown"
    if branch and config.cooldown_start < start:
        raise StateError(f"--cooldown-start {config.cooldown_start} is before the run's step {start}: a cooldown of "
                         f"a constant-rate run starts at or after its last checkpoint")
    for key in HYPERPARAMETERS:
        if branch and key in ("lr_schedule", *COOLDOWN_FIELDS):
            continue  # the rates so far are the cooldown's before its start: the history fits
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


def check_saved_tensors(saved: TrainingState, model_config: ModelConfig, path: Path) -> None:
    """The state's weights and Adam moments must have the shapes of the run's model (found on the
    meta device, without memory), and its weights must be finite."""
    with torch.device("meta"):
        params = list(UNet(model_config).named_parameters())
    shapes = expected_shapes(model_config)
    for part in (saved.model, saved.ema, *([saved.ema_long] if saved.ema_long is not None else [])):
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
