"""One error type for the user: every CLI turns a UserError (or an OSError) into ONE line and a non-zero
exit, and lets anything else, a bug, surface as a traceback."""

import importlib
import inspect
import pkgutil

import pytest

import engine
import engine.apps.cli
import export
import export.cli
import training
import training.cli
from engine.apps.cli import main as engine_main
from engine.errors import UserError
from export.cli import main as export_main
from training.cli import main as train_main

# Exceptions that are not "your input is wrong": the engine stopping under a request, another rank's
# failure (that rank printed its own line), the server's HTTP answer (a status and one line, 4xx
# for bad input but also 429 and 503), a client that left mid-body (nobody to answer), and a request
# ended by the drain past its grace period (a 503).
INTERNAL = {"EngineClosed", "OtherRankFailed", "BadRequest", "ClientGone", "Drained"}


def project_exceptions():
    for package in (engine, export, training):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as e:  # an optional extra that is not installed here
                if e.name.split(".")[0] in ("engine", "export", "training"):
                    raise
                continue
            for name, value in vars(module).items():
                if (inspect.isclass(value) and issubclass(value, BaseException)
                        and value.__module__ == module.__name__):
                    yield value


def test_every_error_class_is_a_user_error_or_named_internal():
    classes = set(project_exceptions())
    assert len(classes) >= 8  # the walk found the tree's error classes
    assert {c.__name__ for c in classes if not issubclass(c, UserError)} == INTERNAL


@pytest.fixture
def garbage(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00" * 64)
    return path


def engine_sample(checkpoint, out, *flags):
    return ["sample", "--checkpoint", str(checkpoint), "--device", "cpu", "--backend", "eager", "--out", str(out),
            "--no-progress", *flags]


BAD_INPUTS = [
    ("engine-missing-checkpoint", engine_main, lambda c, g, d: engine_sample(d / "none.safetensors", d / "o"), 1,
     "checkpoint not found"),
    ("engine-foreign-file", engine_main, lambda c, g, d: engine_sample(g, d / "o"), 1, "not a safetensors file"),
    ("engine-unknown-class", engine_main, lambda c, g, d: engine_sample(c, d / "o", "--classes", "unicorn"), 1,
     "unknown class 'unicorn'"),
    ("engine-steps-over-T", engine_main, lambda c, g, d: engine_sample(c, d / "o", "--steps", "101"), 1,
     "--steps: 101 exceeds the model's T = 100"),
    ("engine-no-cuda", engine_main, lambda c, g, d: engine_sample(c, d / "o") + ["--device", "cuda"], 1,
     "CUDA is not available"),
    ("engine-n-zero", engine_main, lambda c, g, d: engine_sample(c, d / "o", "-n", "0"), 2, "out of range"),
    ("engine-fid-no-samples", engine_main, lambda c, g, d: ["fid", str(d / "none.npz"), "--ref", str(g)], 1, "none.npz"),
    ("export-foreign-file", export_main, lambda c, g, d: ["--checkpoint", str(g), "--out", str(d / "m.onnx")], 1,
     "not a safetensors file"),
    ("export-wrong-suffix", export_main, lambda c, g, d: ["--checkpoint", str(c), "--out", str(d / "m.txt")], 1,
     "must end in .onnx"),
    ("train-no-dataset", train_main, lambda c, g, d: ["--preset", "tiny", "--out", str(d / "run")], 1,
     "--preset and --dataset are required"),
    ("train-missing-data", train_main,
     lambda c, g, d: ["--preset", "tiny", "--dataset", "folder", "--data-dir", str(d / "none"), "--out", str(d / "run")],
     1, "none"),
    ("train-bad-lr", train_main, lambda c, g, d: ["--preset", "tiny", "--dataset", "synthetic", "--lr", "-1"], 2,
     "--lr"),
]


@pytest.mark.parametrize("name, main, argv, code, fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_and_a_non_zero_exit(tiny_checkpoint, garbage, tmp_path, capsys, name, main, argv, code,
                                                   fragment):
    folder = tmp_path / "work"
    folder.mkdir()
    try:
        got = main(argv(tiny_checkpoint, garbage, folder))
    except SystemExit as e:  # argparse's usage errors
        got = e.code
    err = capsys.readouterr().err
    assert got == code, err
    assert len(err.strip().splitlines()) == 1 and fragment in err and "Traceback" not in err, err
    assert list(folder.iterdir()) == []  # nothing written


class Bug(Exception):
    """Stands for a mistake in our code."""


@pytest.mark.parametrize("error", [ValueError("a bug"), KeyError("a bug"), RuntimeError("a bug"), Bug("a bug")],
                         ids=["ValueError", "KeyError", "RuntimeError", "other"])
def test_a_bug_is_not_turned_into_one_line(tiny_checkpoint, tmp_path, monkeypatch, error):
    """What is not a UserError propagates out of each CLI's main (a traceback and exit 1 under Python)."""
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(engine.apps.cli, "build_engine", broken)
    with pytest.raises(type(error)):
        engine_main(engine_sample(tiny_checkpoint, tmp_path / "o", "-n", "2", "--steps", "2"))
    monkeypatch.setattr(export.cli, "export_onnx", broken)
    with pytest.raises(type(error)):
        export_main(["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx")])
    monkeypatch.setattr(training.cli, "train", broken)
    with pytest.raises(type(error)):
        train_main(["--preset", "tiny", "--dataset", "synthetic", "--steps", "1", "--out", str(tmp_path / "run")])
