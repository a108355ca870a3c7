"""The `ddpm-export` console script: export.cli's main(), with Ctrl-C during start-up handled (engine.clitools.console_main)."""

from engine.clitools import console_main


def main() -> int:
    return console_main("ddpm-export", "export.cli")
