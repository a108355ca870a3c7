"""The `ddpm-train` console script: training.cli's main(), with Ctrl-C during start-up handled
(engine.apps.clitools.console_main)."""

from engine.apps.clitools import console_main


def main() -> int:
    return console_main("ddpm-train", "training.cli")
