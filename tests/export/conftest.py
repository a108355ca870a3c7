"""The tiny checkpoint (tests/conftest.py), loaded and exported once per session in each precision."""

import pytest

from engine.formats.checkpoint import load_checkpoint
from engine.formats.onnx_export import export_onnx
from export.cli import main as export_main


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def onnx_fp32(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(tiny, path, fp16=False)
    return path


@pytest.fixture(scope="session")
def onnx_fp16(tiny_checkpoint, tmp_path_factory):
    """Made through the command line, so its success path is exercised too."""
    path = tmp_path_factory.mktemp("onnx") / "tiny-fp16.onnx"
    assert export_main(["--checkpoint", str(tiny_checkpoint), "--fp16", "--out", str(path)]) == 0
    return path
