"""The fuzz tables' shared check: a crafted input or flag is refused by the CLI's main() with a
non-zero exit, at most two lines on stderr and no traceback, and leaves the folder it works in
exactly as it was (nothing new, nothing overwritten)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from engine.config import PRESETS
from engine.model import UNet
from tests.fuzz.crafted import NAMES


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.fixture
def refused(capsys):
    """refused(main, argv, folder, message, seconds=None) -> stderr; see the module docstring.
    `seconds`: the refusal must also come within that time (a size that is refused before anything
    is allocated takes milliseconds; allocating it would take far longer, or exhaust memory)."""
    def check(main, argv: list[str], folder: Path, message: str, seconds: float | None = None) -> str:
        before = snapshot(folder)
        capsys.readouterr()
        start = time.perf_counter()
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            code = e.code
        elapsed = time.perf_counter() - start
        err = capsys.readouterr().err
        assert code not in (0, None), f"exit {code} for {argv}: {err}"
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
        assert message in err, err
        assert snapshot(folder) == before, "the refusal wrote or changed files"
        if seconds is not None:
            assert elapsed < seconds, f"refused only after {elapsed:.1f} s"
        return err
    return check


@pytest.fixture(scope="session")
def fuzz_checkpoint(make_checkpoint) -> tuple[Path, dict[str, list[int]]]:
    """A real checkpoint of the tiny preset (the fuzz tables' class names) and its tensors' shapes."""
    path = make_checkpoint(class_names=NAMES, quiet=False)
    return path, {k: list(v.shape) for k, v in UNet(PRESETS["tiny"]).state_dict().items()}


@pytest.fixture
def no_model_built(monkeypatch):
    """Fail the test if a U-Net is built anywhere but on the meta device."""
    init = UNet.__init__

    def guarded(self, config):
        assert torch.empty(()).device.type == "meta", "a model was built before the input was refused"
        init(self, config)

    monkeypatch.setattr(UNet, "__init__", guarded)
