"""What the three command lines (`ddpm-engine`, `ddpm-export`, `ddpm-train`) and the server share: a
parser whose usage errors are one line, validators for flag values (and for the classes and guidance
a sampling request names), and the `main()` wrapper that turns an expected failure into one
`PROG: error: ...` line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from engine.errors import UserError

if TYPE_CHECKING:
    from engine.config import ModelConfig
    from engine.formats.checkpoint import Checkpoint

MAX_GUIDANCE = 100.0  # far past any useful scale (papers use up to ~10); beyond it images saturate to garbage
MAX_MESSAGE = 300  # characters of an error line: a message never echoes a whole file or flag back


class UsageError(UserError):
    """Bad command-line input, found after parsing (e.g. a class the checkpoint doesn't have)."""


class Parser(argparse.ArgumentParser):
    """argparse with usage examples kept as written, and a usage error as ONE line on stderr (exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(message: object) -> str:
    """The first line of a message, at most MAX_MESSAGE characters."""
    text = str(message).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= MAX_MESSAGE else line[:MAX_MESSAGE - 3] + "..."


@dataclass
class Outcome:
    code: int = 0  # the exit status


@contextmanager
def reported(prog: str, interrupted: str = "interrupted; nothing was written") -> Iterator[Outcome]:
    """Run a command's body; a `UserError` (bad input) or an `OSError` (a file or folder that cannot be
    read or written) becomes one `PROG: error: ...` line and exit status 1, Ctrl-C one line and 130
    (`interrupted` says what was kept). Anything else is a bug and propagates, traceback and all:

        with reported("ddpm-export") as outcome:
            run(args)
        return outcome.code
    """
    outcome = Outcome()
    try:
        yield outcome
    except (UserError, OSError) as e:
        print(f"{prog}: error: {one_line(e) or type(e).__name__}", file=sys.stderr)
        outcome.code = 1
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        outcome.code = 130


def int_range(lo: int, hi: int | None = None):
    """An integer flag in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return value
    return parse


def float_range(lo: float = 0.0, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """A finite float flag in the interval from lo to hi, each end closed unless *_open."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{value} is not a finite number")
        below = value <= lo if lo_open else value < lo
        above = hi is not None and (value >= hi if hi_open else value > hi)
        if below or above:
            interval = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi is None else f'{hi:g}'}{')' if hi_open or hi is None else ']'}"
            raise argparse.ArgumentTypeError(f"{value:g} is out of range {interval}")
        return value
    return parse


non_negative_float = float_range(0.0)
positive_float = float_range(0.0, lo_open=True)
unit_float = float_range(0.0, 1.0)
below_one = float_range(0.0, 1.0, hi_open=True)
at_least_one = float_range(1.0)


def parse_classes(text: str | None, class_names: tuple[str, ...]) -> list[int]:
    if text is None:
        return list(range(len(class_names)))
    classes = []
    for item in text.split(","):
        item = item.strip()
        if item in class_names:
            classes.append(class_names.index(item))
        elif item.isdigit() and int(item) < len(class_names):
            classes.append(int(item))
        else:
            raise UsageError(f"unknown class {item!r}; this model has 0..{len(class_names) - 1}: {', '.join(class_names)}")
    return classes


def model_classes(text: str | None, ckpt: Checkpoint, flag: str = "--classes", default: str | None = None) -> list[int]:
    """The labels named by a class flag (`default` when not given; None: every class); for an
    unconditional model, its one label."""
    if ckpt.config.num_classes == 0:
        if text is not None:
            raise UsageError(f"this model is unconditional: it has no classes to pick with {flag}")
        return [ckpt.config.null_class]
    return parse_classes(default if text is None else text, ckpt.class_names)


def resolve_guidance(flag: float | None, default: float, config: ModelConfig) -> float:
    """--guidance, else the command's default; a model without a learned null class (an unconditional
    or an imported class-conditional one) has nothing to guide away from: 0, and any other scale refused."""
    if config.guidable:
        return default if flag is None else flag
    if flag:
        why = ("this model is unconditional" if config.num_classes == 0
               else "this model has no learned null class (an imported class-conditional model)")
        raise UsageError(f"{why}: --guidance must be 0")
    return 0.0


def console_main(prog: str, module: str) -> int:
    """What a console script runs: import the command's module (torch and all, seconds), then its
    main(); Ctrl-C during that start-up is one line and exit 130, like Ctrl-C during the command."""
    try:
        command = importlib.import_module(module)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return command.main()
