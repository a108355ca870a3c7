"""The README's quick start keeps working: its sample command (the bundled model) and its
train-your-own commands run (with 2 steps)."""

import re
import shlex
from pathlib import Path

from engine.apps.cli import main as engine_main
from training.cli import main as train_main

README = Path(__file__).resolve().parents[1] / "README.md"


def commands_of_block(index: int) -> list[list[str]]:
    """The `ddpm-*` commands of the quick start's code block `index`, split into argv lists."""
    section = re.search(r"## Quick start(.*?)\n## ", README.read_text(), re.S).group(1)
    block = re.findall(r"```bash\n(.*?)```", section, re.S)[index]
    return [shlex.split(part) for part in block.replace("\n", " ").split("&&") if part.strip().startswith("ddpm-")]


def test_quick_start_samples_the_bundled_model(tmp_path, monkeypatch):
    (sample,) = commands_of_block(0)
    assert sample[:2] == ["ddpm-engine", "sample"] and "--checkpoint" not in sample
    monkeypatch.chdir(tmp_path)
    assert engine_main(sample[1:] + ["--steps", "2", "-n", "4", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_train_your_own_runs(tmp_path, monkeypatch):
    commands = commands_of_block(1)
    assert [c[0] for c in commands] == ["ddpm-train", "ddpm-engine"]
    monkeypatch.chdir(tmp_path)
    train, sample = commands
    train[train.index("--steps") + 1] = "2"  # the real run is 800 steps; its flags are what is checked here
    assert train_main(train[1:] + ["--sample-steps", "2", "--device", "cpu", "--no-progress"]) == 0
    assert engine_main(sample[1:] + ["--steps", "2", "-n", "4", "--device", "cpu", "--no-progress"]) == 0
    assert (tmp_path / "samples-tiny" / "grid.png").is_file()
