"""Careless and hostile flag values for the three CLIs: refused in one short line (no flag is
echoed whole), before any work, leaving the output location as it was."""

from __future__ import annotations

import pytest

from engine.apps.cli import main as engine_main
from export.cli import main as export_main
from training.cli import main as train_main

LONG = "x" * 2_000_000  # a 2 MB value must not come back in the message

SAMPLE = [
    (["--guidance", "nan"], "not a finite number"),
    (["--guidance", "inf"], "not a finite number"),
    (["--guidance", "1e30"], "out of range"),
    (["--guidance", "-1"], "out of range"),
    (["--eta", "inf"], "not a finite number"),
    (["--eta", "-0.5"], "out of range"),
    (["-n", "0"], "out of range"),
    (["-n", "1.5"], "not an integer"),
    (["-n", LONG], "not an integer"),
    (["--steps", "0"], "out of range"),
    (["--steps", "100000000"], "exceeds the model's T"),
    (["--seed", "-1"], "out of range"),
    (["--seed", str(2**80)], "out of range"),
    (["--batch-size", "0"], "out of range"),
    (["--classes", "nope"], "unknown class 'nope'"),
    (["--classes", LONG], "unknown class"),
    (["--sampler", LONG], "invalid choice"),
    (["--device", "tpu"], "tpu"),
]


@pytest.mark.parametrize("flags, message", SAMPLE, ids=[f"{f[0]}={f[1][:12]}" for f, _ in SAMPLE])
def test_sample_flags(refused, tmp_path, fuzz_checkpoint, flags, message):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "grid.png").write_bytes(b"an earlier grid")
    defaults = {"-n": "2", "--steps": "1"}
    argv = ["sample", "--checkpoint", fuzz_checkpoint[0], "--device", "cpu", "--no-progress",
            "--out", tmp_path / "samples", *flags]
    for flag, value in defaults.items():
        if flag not in flags:
            argv += [flag, value]
    err = refused(engine_main, argv, tmp_path, message, seconds=10.0)
    assert len(err) < 400


EXPORT = [
    (["--opset", "999"], "not a supported opset"),
    (["--opset", LONG], "argument --opset"),
    (["--out", "model.txt"], "must end in .onnx"),
]


@pytest.mark.parametrize("flags, message", EXPORT, ids=[f"{f[0]}={f[1][:12]}" for f, _ in EXPORT])
def test_export_flags(refused, tmp_path, fuzz_checkpoint, flags, message):
    (tmp_path / "out.onnx").write_bytes(b"an earlier export")
    out = [] if "--out" in flags else ["--out", tmp_path / "out.onnx"]
    err = refused(export_main, ["--checkpoint", fuzz_checkpoint[0], *out, *flags], tmp_path, message)
    assert len(err) < 400


TRAIN = [
    (["--lr", "nan"], "not a finite number"),
    (["--lr", "inf"], "not a finite number"),
    (["--lr", "0"], "out of range"),
    (["--batch-size", "0"], "out of range"),
    (["--batch-size", "100000"], "is more than the 1000 images"),
    (["--steps", "-1"], "out of range"),
    (["--steps", "1.5"], "not an integer"),
    (["--epochs", "nan"], "not a finite number"),
    (["--p-uncond", "1.5"], "out of range"),
    (["--ema-decay", "1"], "out of range"),
    (["--seed", str(2**40)], "out of range"),
    (["--warmup-multiplier", "0.5"], "out of range"),
    (["--time-limit", "0"], "out of range"),
    (["--dropout", "1"], "out of range"),
    (["--fid-every", "5"], "--fid-every needs --fid-ref"),
    (["--preset", LONG], "invalid choice"),
    (["--lr-schedule", "linear"], "invalid choice"),
    (["--device", "tpu"], "unknown device 'tpu'"),
]


@pytest.mark.parametrize("flags, message", TRAIN, ids=[f"{f[0]}={f[1][:12]}" for f, _ in TRAIN])
def test_train_flags(refused, tmp_path, flags, message):
    base = {"--preset": "tiny", "--dataset": "synthetic", "--steps": "1", "--batch-size": "2", "--device": "cpu"}
    argv = [*flags, "--out", tmp_path / "run", "--no-progress"]
    for flag, value in base.items():
        if flag not in flags:
            argv += [flag, value]
    err = refused(train_main, argv, tmp_path, message, seconds=10.0)
    assert len(err) < 400


def test_out_that_is_a_file_is_one_line(refused, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    refused(train_main, ["--out", tmp_path / "run", "--resume", "--preset", "tiny", "--dataset", "synthetic",
                         "--device", "cpu"], tmp_path, "exists and is not a folder")
