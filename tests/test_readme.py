"""The README's quick start keeps working: its train and sample commands run (with 2 steps)."""

import re
import shlex
from pathlib import Path

from engine.cli import main as engine_main
from training.cli import main as train_main

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_commands() -> list[list[str]]:
    """The `ddpm-*` commands of the quick start's first code block, split into argv lists."""
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", README.read_text(), re.S).group(1)
    return [shlex.split(part) for part in block.replace("\n", " ").split("&&") if part.strip().startswith("ddpm-")]


def test_quick_start_train_and_sample_run(tmp_path, monkeypatch):
    commands = quick_start_commands()
    assert [c[0] for c in commands] == ["ddpm-train", "ddpm-engine"]
    monkeypatch.chdir(tmp_path)
    train, sample = commands
    train[train.index("--steps") + 1] = "2"  # the real run is 800 steps; its flags are what is checked here
    assert train_main(train[1:] + ["--sample-steps", "2", "--device", "cpu", "--no-progress"]) == 0
    assert engine_main(sample[1:] + ["--steps", "2", "-n", "4", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
