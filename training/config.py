"""A run's settings: `TrainConfig`, the one check of its values (whatever made it: flags, code or a
saved state), and what --resume keeps of a saved run."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from engine.config import PRESETS, ModelConfig
from engine.errors import ConfigError
from training.data import DATASETS
from training.state import STATE_FILE, StateError, read_train_config

DEFAULT_EPOCHS = 200  # the report's run length when neither --steps nor --epochs is given
# The cooldown's default shape: Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond
# Fixed Training Durations") found the 1-sqrt decay matches or beats the linear one.
COOLDOWN_SHAPE = "1-sqrt"


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
    lr_schedule: str = "cosine"         # after the warm-up: "constant", "cosine" (to 0 at the end) or "cooldown"
    cooldown_start: int | None = None   # "cooldown": constant until this step, then the decay
    cooldown_steps: int | None = None   # its length: the rate reaches 0 at start + steps, the run's end
    cooldown_shape: str | None = None   # its shape, "1-sqrt" or "linear"; None: COOLDOWN_SHAPE
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    p_uncond: float = 0.1               # probability of replacing a label by the null class
    ema_decay: float = 0.9999
    ema_long_decay: float | None = None # a second, longer EMA (model-ema-long.safetensors); None: none
    ema_warmup: bool = True             # ramp the EMAs' decay with the step (ema_decay_at); off for --init-from
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
    precision: str = "auto"            # "auto" (see train.autocast_bf16), "fp32" or "bf16"
    compile: bool = False
    progress: bool = True
    resume: bool = False


COOLDOWN_FIELDS = ("cooldown_start", "cooldown_steps", "cooldown_shape")  # given with --lr-schedule cooldown only
# The fields that define a run: a resumed run must keep them, with one exception (prepare.check_resume):
# a constant-rate run may be resumed as a cooldown that starts at or after its step, since a cooldown's
# rate before its start is the constant one.
HYPERPARAMETERS = ("preset", "dataset", "batch_size", "lr", "warmup_multiplier", "warmup_epochs", "lr_schedule",
                   *COOLDOWN_FIELDS, "weight_decay", "grad_clip", "p_uncond", "ema_decay", "min_snr_gamma",
                   "dropout", "seed")
# What --resume takes from the saved run unless given again: the hyper-parameters, where the data
# is, and how the run checkpoints, logs, samples and scores. Not kept: the length (kept unless
# --steps/--epochs is given; a cooldown's is where its decay ends), --device, --compile, --time-limit and the progress bar, which
# belong to one invocation.
KEPT_ON_RESUME = HYPERPARAMETERS + ("data_dir", "checkpoint_every", "log_every", "sample_every", "sample_steps",
                                    "sample_sampler", "fid_every", "fid_samples", "fid_ref", "precision",
                                    "ema_long_decay", "ema_warmup")


@dataclass(frozen=True)
class Range:
    """The values of a numeric field: numbers of `kind` (int or float) from lo to hi (None: no
    bound), each end included unless it is open."""

    kind: type
    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def problem(self, value: object) -> str | None:
        """What is wrong with `value`, in the words of a flag's error; None when it is in the range."""
        if type(value) not in (int, float):
            return f"{str(value)[:40]!r} is not a number"
        if self.kind is int:
            if type(value) is not int:
                return f"{repr(value)[:40]!r} is not an integer"
            if value < self.lo or (self.hi is not None and value > self.hi):
                return f"{value} is out of range {self}"
            return None
        try:
            number = float(value)
        except OverflowError:  # an int past the floats, e.g. from a state file
            number = math.inf if value > 0 else -math.inf
        if not math.isfinite(number):
            return f"{number} is not a finite number"
        below = number <= self.lo if self.lo_open else number < self.lo
        above = self.hi is not None and (number >= self.hi if self.hi_open else number > self.hi)
        return f"{number:g} is out of range {self}" if below or above else None

    def __str__(self) -> str:
        if self.kind is int:
            return f"[{self.lo}, {'inf' if self.hi is None else self.hi}]"
        hi = "inf" if self.hi is None else f"{self.hi:g}"
        return f"{'(' if self.lo_open else '['}{self.lo:g}, {hi}{')' if self.hi_open or self.hi is None else ']'}"


# The one definition of each numeric field's type and range: check_config applies it to every
# TrainConfig (from flags, code or a state file), and ddpm-train parses its flags with it.
FIELD_RANGES = {
    "steps": Range(int, 0), "epochs": Range(float, 0), "batch_size": Range(int, 1),
    "seed": Range(int, 0, 2**32 - 1), "lr": Range(float, 0, lo_open=True), "warmup_multiplier": Range(float, 1),
    "warmup_epochs": Range(float, 0), "weight_decay": Range(float, 0), "grad_clip": Range(float, 0, lo_open=True),
    "p_uncond": Range(float, 0, 1), "ema_decay": Range(float, 0, 1, hi_open=True),
    "ema_long_decay": Range(float, 0, 1, hi_open=True),
    "dropout": Range(float, 0, 1, hi_open=True), "min_snr_gamma": Range(float, 0, lo_open=True),
    "checkpoint_every": Range(int, 1), "sample_every": Range(int, 0), "sample_steps": Range(int, 1),
    "log_every": Range(int, 1), "fid_every": Range(int, 0), "fid_samples": Range(int, 2),
    "time_limit": Range(float, 0, lo_open=True), "cooldown_start": Range(int, 0), "cooldown_steps": Range(int, 1),
}
CHOICES = {"preset": tuple(PRESETS), "dataset": DATASETS, "lr_schedule": ("constant", "cosine", "cooldown"),
           "cooldown_shape": ("1-sqrt", "linear"), "precision": ("auto", "fp32", "bf16"),
           "sample_sampler": ("ddim", "dpm++2m")}
OPTIONAL = ("steps", "epochs", "warmup_epochs", "dropout", "min_snr_gamma", "time_limit", "data_dir", "init_from",
            "fid_ref", "ema_long_decay", *COOLDOWN_FIELDS)


def check_config(config: TrainConfig, processes: int = 1) -> None:
    """The one check of a TrainConfig's values, whatever made it: types (an int is not 3.0 or
    true), ranges (FIELD_RANGES), choices and the rules that tie fields together."""
    problems = []
    for field in dataclasses.fields(TrainConfig):
        problem = field_problem(field, getattr(config, field.name))
        if problem is not None:
            problems.append(f"--{field.name.replace('_', '-')} {problem}")
    if config.steps is not None and config.epochs is not None:
        problems.append("give --steps or --epochs, not both")
    if type(config.batch_size) is int and processes > 1 and config.batch_size % processes:
        problems.append(f"--batch-size {config.batch_size} must be a multiple of the {processes} processes")
    if config.fid_every and not config.fid_ref:
        problems.append("--fid-every needs --fid-ref STATS.npz (write one with ddpm-engine fid-ref)")
    problems += cooldown_problems(config)
    if problems:
        raise ConfigError("; ".join(problems))


def cooldown_problems(config: TrainConfig) -> list[str]:
    """The rules of --lr-schedule cooldown: its start and length are given, and only with it, and the
    run ends where the decay does."""
    stray = [name for name in COOLDOWN_FIELDS if getattr(config, name) is not None]
    if config.lr_schedule != "cooldown":
        return [f"--{stray[0].replace('_', '-')} needs --lr-schedule cooldown"] if stray else []
    if config.cooldown_start is None or config.cooldown_steps is None:
        return ["--lr-schedule cooldown needs --cooldown-start STEP and --cooldown-steps N"]
    if type(config.cooldown_start) is not int or type(config.cooldown_steps) is not int:
        return []  # reported by their ranges
    end = config.cooldown_start + config.cooldown_steps
    if config.epochs is not None or config.steps not in (None, end):
        return [(f"a cooldown run ends where its decay does, at step {end} (--cooldown-start + --cooldown-steps): "
                 f"give no --steps/--epochs, or --steps {end}")]
    return []


def field_problem(field: dataclasses.Field, value: object) -> str | None:
    """What is wrong with one field's value, or None."""
    if value is None and field.name in OPTIONAL:
        return None
    if field.name in FIELD_RANGES:
        return FIELD_RANGES[field.name].problem(value)
    if field.name in CHOICES:
        choices = CHOICES[field.name]
        return None if value in choices else f"{str(value)[:40]!r} is not one of {', '.join(choices)}"
    flag = field.type == "bool"
    if type(value) is not (bool if flag else str):
        return f"{str(value)[:40]!r} is not a {'flag' if flag else 'string'}"
    return None


def resolve(config: TrainConfig, dataset_size: int, preset: ModelConfig) -> tuple[TrainConfig, int]:
    """Fill in the defaults that depend on the data; returns (config, total steps)."""
    if config.steps is not None:
        total = config.steps
    elif config.lr_schedule == "cooldown":
        total = config.cooldown_start + config.cooldown_steps  # the run ends with its decay
    else:
        epochs = config.epochs if config.epochs is not None else DEFAULT_EPOCHS
        total = math.ceil(epochs * dataset_size / config.batch_size)
    total_epochs = total * config.batch_size / dataset_size
    config = dataclasses.replace(
        config, steps=total, epochs=None,
        warmup_epochs=config.warmup_epochs if config.warmup_epochs is not None else total_epochs / 10,
        dropout=config.dropout if config.dropout is not None else preset.dropout,
        cooldown_shape=config.cooldown_shape or (COOLDOWN_SHAPE if config.lr_schedule == "cooldown" else None))
    return config, total


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
        what = f"unknown field {min(unknown)[:40]!r}" if unknown else f"no {min(missing)}"
        raise StateError(f"{path}: its training config is invalid ({what})")
    try:
        check_config(TrainConfig(**with_defaults(saved)))
    except ConfigError as e:
        raise StateError(f"{path}: its training config is invalid ({e})") from None
    return saved
