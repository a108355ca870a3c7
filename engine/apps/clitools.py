"""What the three command lines (`ddpm-engine`, `ddpm-export`, `ddpm-train`) share: a parser whose
usage errors are one line, validators for flag values, the flags of the sampling fields (made from
engine.settings.FIELDS), and the `main()` wrapper that turns an expected failure into one
`PROG: error: ...` line and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from engine.errors import UserError
from engine.settings import FIELDS, SETTINGS, FieldError, SampleSettings

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
        message = f"{flag_of(e.field)}: {e.problem}" if isinstance(e, FieldError) else e
        print(f"{prog}: error: {one_line(message) or type(e).__name__}", file=sys.stderr)
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


def flag_of(field: str) -> str:
    """A sampling field's name as a flag: clip_x0 -> --clip-x0."""
    return "--" + field.replace("_", "-")


def field_flag(parser: argparse.ArgumentParser, name: str, *aliases: str, default: object = ...,
               help: str | None = None, choices: tuple[str, ...] | None = None, metavar: str | None = None) -> None:
    """The flag of the sampling field `name` (engine.settings.FIELDS): its type, range, choices and help
    from the table, its default SampleSettings' unless the command has its own (`default`), and the
    command's own words where given. A refused value is argparse's one line, `argument --steps: ...`."""
    field = FIELDS[name]
    default = field.default if default is ... else default
    if help is None:
        help = field.help
        if field.kind is not bool and default is not None and "(default:" not in help:
            help += f" (default: {default:g})" if isinstance(default, float) else f" (default: {default})"
    if field.kind is bool:
        parser.add_argument(flag_of(name), *aliases, action="store_true", help=help)
        return

    def parse(value: str):
        try:
            return field.parse(value)
        except FieldError as e:
            raise argparse.ArgumentTypeError(e.problem) from None

    parser.add_argument(flag_of(name), *aliases, type=None if field.kind is str else parse, default=default,
                        choices=choices or field.choices, metavar=metavar, help=help)


def settings_of(args: argparse.Namespace, **given) -> SampleSettings:
    """The SampleSettings of a command's parsed flags (a field without a flag keeps its default), with
    `given` over them (e.g. the guidance resolved against the model)."""
    return SampleSettings(**{**{name: getattr(args, name) for name in SETTINGS if hasattr(args, name)}, **given})


def console_main(prog: str, module: str) -> int:
    """What a console script runs: import the command's module (torch and all, seconds), then its
    main(); Ctrl-C during that start-up is one line and exit 130, like Ctrl-C during the command."""
    try:
        command = importlib.import_module(module)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    return command.main()
