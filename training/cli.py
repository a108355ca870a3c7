"""`ddpm-train`: train a class-conditional DDPM; parses the flags, then calls training.train.train."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from engine.apps.clitools import Parser, reported
from engine.errors import ConfigError
from training.config import (
    CHOICES,
    COOLDOWN_FIELDS,
    COOLDOWN_SHAPE,
    DEFAULT_EPOCHS,
    FIELD_RANGES,
    KEPT_ON_RESUME,
    TrainConfig,
    saved_config,
)
from training.prepare import OtherRankFailed
from training.train import train

EXAMPLES = """examples:
  # a CPU smoke run (a few minutes), then sample from it
  ddpm-train --preset tiny --dataset synthetic --steps 800 --batch-size 32 --lr 2e-3 \\
      --warmup-multiplier 1 --warmup-epochs 2 --out runs/tiny
  ddpm-engine sample --checkpoint runs/tiny/model.safetensors -n 20 --out samples

  # the report's CIFAR-10 run (downloads the official archive into ./data when absent)
  ddpm-train --preset ddpm-cifar10 --dataset cifar10 --epochs 200 --batch-size 128 --out runs/cifar10

  # continue a run that stopped or was killed, from its last checkpoint
  ddpm-train --out runs/cifar10 --resume

  # STL-10 (stl10_binary/ extracted in ./data) on 8 GPUs, global batch 128
  torchrun --nproc-per-node 8 -m training.cli --preset ddpm-stl10 --dataset stl10 --out runs/stl10

  # an image folder (one sub-folder per class) with a plain linear warm-up to 2e-4
  ddpm-train --preset cifar10-compact --dataset folder --data-dir cifar10-jpeg/train \\
      --lr 2e-4 --warmup-multiplier 1 --warmup-epochs 10 --lr-schedule constant --out runs/jpeg

  # cool a copy of that constant-rate run from its checkpoint at step 50000 to 0 over 10000 steps;
  # runs/jpeg stays as it is, to go on and be cooled again later
  cp -r runs/jpeg runs/jpeg-cooled
  ddpm-train --out runs/jpeg-cooled --resume --lr-schedule cooldown --cooldown-start 50000 \\
      --cooldown-steps 10000
"""

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def field(name: str) -> dict:
    """A flag for TrainConfig.<name>: its type and range from training.config.FIELD_RANGES (the one
    definition, which check_config also applies), and default None so that --resume can tell a
    given flag from a default."""
    return {"type": flag_type(name), "default": None}


def flag_type(name: str):
    """The argparse type of TrainConfig.<name>'s flag: the text as an int or a float, in the field's
    Range, with check_config's words."""
    values = FIELD_RANGES[name]

    def parse(text: str) -> int | float:
        try:
            value = values.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text[:40]!r} is not {'an integer' if values.kind is int else 'a number'}") from None
        problem = values.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def build_parser() -> Parser:
    parser = Parser(prog="ddpm-train", epilog=EXAMPLES,
                    description="Train a class-conditional DDPM with classifier-free guidance (label dropping), "
                                "Eq. 6 warm-up, EMA and resumable checkpoints. Writes OUT/model.safetensors "
                                "(EMA weights, loadable by ddpm-engine), OUT/state.safetensors (for --resume), "
                                "OUT/log.csv and OUT/samples/step-XXXXXXX.png. Runs under torchrun for "
                                "several GPUs (or CPU processes).")
    add_run_flags(parser)
    add_recipe_flags(parser)
    add_output_flags(parser)
    return parser


def add_run_flags(parser: Parser) -> None:
    d = DEFAULTS
    run = parser.add_argument_group("run")
    run.add_argument("--preset", choices=CHOICES["preset"], help="model preset (required unless --resume)")
    run.add_argument("--dataset", choices=CHOICES["dataset"], help="training data (required unless --resume)")
    run.add_argument("--data-dir", type=Path, default=None,
                     help="where the dataset is (cifar10, stl10: default ./data; cifar10 is downloaded there "
                          "when absent); for folder: the folder of class sub-folders")
    run.add_argument("--out", type=Path, required=True, help="run folder")
    length = run.add_mutually_exclusive_group()
    length.add_argument("--steps", **field("steps"),
                        help="optimizer steps in total (with --resume: a new length for the run, which stretches or "
                             "shortens a cosine decay still to come; a warning says so)")
    length.add_argument("--epochs", **field("epochs"),
                        help=f"passes over the data in total, fractional allowed (default: {DEFAULT_EPOCHS})")
    run.add_argument("--batch-size", **field("batch_size"),
                     help=f"global batch, split between processes; at most the data set's size "
                          f"(default: {d['batch_size']})")
    run.add_argument("--seed", **field("seed"), help=f"default: {d['seed']}")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --out from its last checkpoint (starts one if there is none), with "
                          "its settings: hyper-parameters (given again, they must be equal; but a constant-rate run "
                          "may become a --lr-schedule cooldown), --data-dir, "
                          "--precision and the --checkpoint/log/sample/fid settings (given again, the new value "
                          "holds) and its length unless --steps/--epochs is given; --device, --compile and "
                          "--time-limit are this invocation's")


def add_recipe_flags(parser: Parser) -> None:
    d = DEFAULTS
    recipe = parser.add_argument_group("recipe")
    recipe.add_argument("--lr", **field("lr"), help=f"base_lr of Eq. 6 (default: {d['lr']})")
    recipe.add_argument("--warmup-multiplier", **field("warmup_multiplier"),
                        help=f"Eq. 6 multiplier: the rate ramps to lr * multiplier; 1 ramps from 0 to lr "
                             f"(default: {d['warmup_multiplier']})")
    recipe.add_argument("--warmup-epochs", **field("warmup_epochs"),
                        help="length of the ramp in (fractional) epochs (default: a tenth of the run)")
    recipe.add_argument("--lr-schedule", choices=CHOICES["lr_schedule"], default=None,
                        help=f"after the warm-up: constant, cosine (to 0 at the end) or cooldown (constant, "
                             f"then to 0 from --cooldown-start over --cooldown-steps, where the run ends; a "
                             f"constant-rate run can be resumed as one, from its last checkpoint on) "
                             f"(default: {d['lr_schedule']})")
    recipe.add_argument("--cooldown-start", **field("cooldown_start"),
                        help="the step where the cooldown's decay begins")
    recipe.add_argument("--cooldown-steps", **field("cooldown_steps"),
                        help="the decay's length in steps: the rate reaches 0 at --cooldown-start + this, the "
                             "run's end")
    recipe.add_argument("--cooldown-shape", choices=CHOICES["cooldown_shape"], default=None,
                        help=f"the decay over the cooldown's progress p: lr * (1 - sqrt(p)) or lr * (1 - p) "
                             f"(default: {COOLDOWN_SHAPE}, which Hägele et al. 2024 found to match or beat "
                             f"linear)")
    recipe.add_argument("--weight-decay", **field("weight_decay"),
                        help=f"AdamW weight decay (default: {d['weight_decay']})")
    recipe.add_argument("--grad-clip", **field("grad_clip"),
                        help=f"max gradient norm (default: {d['grad_clip']})")
    recipe.add_argument("--p-uncond", **field("p_uncond"),
                        help=f"probability of training a sample on the null class (default: {d['p_uncond']})")
    recipe.add_argument("--ema-decay", **field("ema_decay"), help=f"default: {d['ema_decay']}")
    recipe.add_argument("--ema-long-decay", **field("ema_long_decay"),
                        help="also keep a second, longer EMA of the weights (e.g. 0.9999), written as "
                             "model-ema-long.safetensors at each checkpoint; one added to a resumed run starts from "
                             "the first EMA (default: none)")
    recipe.add_argument("--dropout", **field("dropout"), help="default: the preset's")
    recipe.add_argument("--min-snr-gamma", **field("min_snr_gamma"),
                        help="weight each sample's loss by min(SNR_t, gamma) / SNR_t (Min-SNR-gamma, Hang et al. "
                             "2023; 5 is theirs) instead of the report's plain L_simple (default: off)")
    recipe.add_argument("--init-from", type=Path, default=None,
                        help="start a new run from this checkpoint's weights (model and EMA; fresh optimizer), "
                             "e.g. to continue a model on a new machine or to fine-tune; implies --no-ema-warmup")
    recipe.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=None,
                        help="ramp the EMA decays from 0.9 toward their values over the first steps, "
                             "min(decay, (1 + step) / (10 + step)), so that an EMA of a new run forgets the random "
                             "init; --no-ema-warmup applies the decays from the first step, as an EMA that starts "
                             "from trained weights should (default: on, off with --init-from)")


def add_output_flags(parser: Parser) -> None:
    d = DEFAULTS
    output = parser.add_argument_group("output and speed")
    output.add_argument("--checkpoint-every", **field("checkpoint_every"),
                        help=f"steps between checkpoints (default: {d['checkpoint_every']}; always at the end)")
    output.add_argument("--sample-every", **field("sample_every"),
                        help=f"steps between sample grids, 0 for none (default: {d['sample_every']}; and at "
                             f"the end, unless that grid would cost over a tenth of the run's training)")
    output.add_argument("--sample-steps", **field("sample_steps"),
                        help=f"steps of the sample grids and FID evaluations (default: {d['sample_steps']})")
    output.add_argument("--sample-sampler", choices=CHOICES["sample_sampler"], default=None,
                        help=f"their deterministic sampler (default: {d['sample_sampler']})")
    output.add_argument("--log-every", **field("log_every"),
                        help=f"steps between log.csv rows (default: {d['log_every']})")
    output.add_argument("--fid-every", **field("fid_every"),
                        help="steps between FID evaluations of the EMA model, logged in log.csv's fid column "
                             "(default: 0, none; needs --fid-ref and the eval extra)")
    output.add_argument("--fid-samples", **field("fid_samples"),
                        help=f"images per FID evaluation, class-balanced, --sample-sampler for --sample-steps, w = 1.8 "
                             f"(default: {d['fid_samples']})")
    output.add_argument("--fid-ref", type=Path, default=None,
                        help="reference statistics for --fid-every, from ddpm-engine fid-ref")
    output.add_argument("--time-limit", **field("time_limit"),
                        help="minutes of wall time after which the run checkpoints and stops (continue it "
                             "with --resume); the schedule still spans --steps/--epochs")
    output.add_argument("--device", default=None, help="auto, cpu or cuda[:k] (default: auto)")
    output.add_argument("--precision", choices=CHOICES["precision"], default=None,
                        help="bf16 autocast (+ channels_last on CUDA) or fp32 (default: auto = bf16 on CUDA and on "
                             "CPUs with bf16 instructions, else fp32)")
    output.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA: faster after warm-up)")
    output.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def make_config(args: argparse.Namespace) -> TrainConfig:
    """The flags given on the command line over, with --resume, the saved run's settings
    (KEPT_ON_RESUME), over the defaults. The one place a resumed run's settings are merged;
    train() checks the result (and refuses changed hyper-parameters)."""
    given = {name: getattr(args, name) for name in DEFAULTS if getattr(args, name, None) is not None}
    given["compile"], given["progress"], given["resume"] = args.compile, not args.no_progress, args.resume
    given["out"] = str(args.out)
    for name in ("data_dir", "init_from", "fid_ref"):
        if getattr(args, name) is not None:
            given[name] = str(getattr(args, name))
    saved = saved_config(args.out) if args.resume else None
    if saved is None:
        if "init_from" in given and "ema_warmup" not in given:
            given["ema_warmup"] = False  # its EMA starts from trained weights: nothing to forget
        if args.preset is None or args.dataset is None:
            raise ConfigError("--preset and --dataset are required for a new run")
        return TrainConfig(**given)
    keep = {k: saved[k] for k in KEPT_ON_RESUME if k in saved and k not in given}
    if (keep | given).get("lr_schedule", DEFAULTS["lr_schedule"]) == "cooldown":
        return TrainConfig(**(keep | given))  # its length is where its decay ends (resolve)
    # A cooldown run resumed with another schedule is refused for that schedule, not for its cooldown.
    keep = {k: v for k, v in keep.items() if k not in COOLDOWN_FIELDS}
    if "steps" not in given and "epochs" not in given:
        keep["steps"] = saved.get("steps")
    return TrainConfig(**(keep | given))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = os.environ.get("RANK", "0")
    try:
        with reported("ddpm-train" if rank == "0" else f"ddpm-train [rank {rank}]",
                      interrupted=f"interrupted; the last checkpoint in {args.out} is intact (continue with --resume)"
                      ) as outcome:
            path = train(make_config(args))
            if rank == "0":
                print(f"wrote {path}")
    except OtherRankFailed:  # that rank printed the error
        return 1
    return outcome.code


if __name__ == "__main__":
    sys.exit(main())
