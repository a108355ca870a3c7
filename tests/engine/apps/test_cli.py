import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from engine.apps.cli import main
from engine.formats.checkpoint import load_checkpoint, save_checkpoint
from tests.support import same_images


def sample(checkpoint, out, *extra):
    return main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--steps", "3", *map(str, extra)])


def test_sample_writes_grid_images_and_npz(checkpoint, tmp_path, capsys):
    out = tmp_path / "samples"
    assert sample(checkpoint, out, "-n", 7, "--classes", "cat,1,dog", "--guidance", 2, "--batch-size", 3) == 0
    data = np.load(out / "samples.npz")
    assert data["x"].shape == (7, 32, 32, 3) and data["x"].dtype == np.uint8
    assert data["y"].dtype == np.int64 and data["y"].tolist() == [3, 1, 5, 3, 1, 5, 3]
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000004.png")), data["x"][4])
    grid = Image.open(out / "grid.png")
    # One row per class (3 rows), scaled x2, 2-px gaps.
    assert grid.size[1] == 2 * (3 * 34 + 2)
    assert str(out) in capsys.readouterr().out


def test_same_seed_same_images_across_runs_and_batch_sizes(checkpoint, tmp_path):
    sample(checkpoint, tmp_path / "a", "-n", 4, "--seed", 9, "--sampler", "ddpm", "--batch-size", 4)
    sample(checkpoint, tmp_path / "b", "-n", 4, "--seed", 9, "--sampler", "ddpm", "--batch-size", 1)
    a, b = np.load(tmp_path / "a" / "samples.npz")["x"], np.load(tmp_path / "b" / "samples.npz")["x"]
    assert same_images(a, b)


def test_interpolate_writes_a_grid(checkpoint, tmp_path):
    out = tmp_path / "interp"
    assert main(["interpolate", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--class", "ship", "--frames", "5", "--steps", "2"]) == 0
    assert Image.open(out / "interpolation.png").size == (2 * (5 * 34 + 2), 2 * (2 * 34 + 2))


@pytest.mark.parametrize("args, message", [
    (["-n", "0"], "out of range"),
    (["-n", "1000000000000"], "out of range"),
    (["-n", "two"], "not an integer"),
    (["--classes", "cat,unicorn"], "unknown class 'unicorn'"),
    (["--classes", "10"], "unknown class '10'"),
    (["--steps", "51"], "exceeds the model's T = 50"),
    (["--steps", "0"], "out of range"),
    (["--guidance", "-1"], "-1 is out of range [0, 100]"),
    (["--eta", "nan"], "not a finite number"),
    (["--eta", "inf"], "not a finite number"),
    (["--guidance", "inf"], "not a finite number"),
    (["--guidance", "1e30"], "out of range [0, 100]"),
    (["--seed", "-3"], "out of range"),
])
def test_bad_input_is_one_line_and_nonzero(checkpoint, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    try:
        code = main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress", *args])
    except SystemExit as e:  # rejected by the parser
        code = e.code
    assert code != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unreadable_checkpoint_and_unwritable_out(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    assert main(["sample", "--device", "cpu", "--checkpoint", str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "not a safetensors file" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits
        locked.chmod(0o700)
        (locked / "no").write_text("a file where a folder is needed")
        target, message = locked / "no" / "dir", "is not a folder"
    else:
        target, message = locked / "dir", "not writable"
    assert main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(target)]) == 1
    assert message in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(blocker)]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_missing_parent_folders_are_created(checkpoint, tmp_path):
    assert sample(checkpoint, tmp_path / "a" / "b", "-n", 2) == 0
    assert (tmp_path / "a" / "b" / "grid.png").is_file()


def test_failure_mid_run_leaves_no_partial_output(checkpoint, tmp_path, monkeypatch):
    import engine.formats.images

    calls = []

    def failing_save(path, image, scale=1):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        Image.fromarray(image).save(path)

    monkeypatch.setattr(engine.formats.images, "save_png", failing_save)
    assert sample(checkpoint, tmp_path / "new" / "out", "-n", 5) == 1
    assert os.listdir(tmp_path) == []


def test_console_script_help_has_examples():
    result = subprocess.run([sys.executable, "-m", "engine.apps.cli", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "examples:" in result.stdout and "--guidance" in result.stdout


def test_no_bundled_model_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import engine.formats.opener

    monkeypatch.setattr(engine.formats.opener, "BUNDLED_CHECKPOINT", tmp_path / "absent.safetensors")
    assert main(["sample", "--device", "cpu", "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no bundled model" in err and "--checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_non_finite_model_output_is_an_error_not_black_images(checkpoint, tmp_path, capsys):
    ckpt = load_checkpoint(checkpoint)
    with torch.no_grad():
        ckpt.model.conv_out.bias[0] = 3e38  # finite weights (a NaN/inf weight is refused at load), inf outputs
    broken = tmp_path / "broken.safetensors"
    save_checkpoint(broken, ckpt.model, ckpt.diffusion, ckpt.class_names)
    out = tmp_path / "out"
    assert main(["sample", "--device", "cpu", "--checkpoint", str(broken), "-n", "2", "--steps", "2", "--out", str(out),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_ctrl_c_during_start_up_is_one_line(tmp_path, monkeypatch, capsys):
    """The console scripts import their command (torch and all) inside console_main, so Ctrl-C while
    that import runs is one line and exit 130, not Python's traceback."""
    from engine.apps.clitools import console_main

    (tmp_path / "slow_start.py").write_text("raise KeyboardInterrupt  # Ctrl-C while importing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert console_main("ddpm-engine", "slow_start") == 130
    err = capsys.readouterr().err
    assert err.strip() == "ddpm-engine: interrupted; nothing was written"


def test_console_scripts_run_the_commands(monkeypatch):
    from pathlib import Path

    import tomllib

    from engine.apps import console

    pyproject = Path(__file__).parents[3] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts == {"ddpm-train": "training.console:main", "ddpm-engine": "engine.apps.console:main",
                       "ddpm-export": "export.console:main"}
    monkeypatch.setattr(sys, "argv", ["ddpm-engine", "--help"])
    with pytest.raises(SystemExit) as e:  # --help through the console entry: engine.apps.cli's parser
        console.main()
    assert e.value.code == 0
