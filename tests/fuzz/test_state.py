"""Crafted training states (state.safetensors) under `ddpm-train --resume`: refused in one line,
leaving the run folder as it was."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.fuzz.crafted import safetensors
from training.cli import main as train_main
from training.config import TrainConfig
from training.train import train


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """A one-step tiny run: its state's tensors and metadata are what the cases bend."""
    out = tmp_path_factory.mktemp("real") / "run"
    train(TrainConfig(preset="tiny", dataset="synthetic", out=str(out), steps=1, batch_size=2, sample_every=0,
                      progress=False, device="cpu"))
    with safe_open(str(out / "state.safetensors"), "pt") as f:
        metadata = f.metadata()
    return out, load_file(str(out / "state.safetensors")), metadata


def bent(tensors=None, **metadata_changes):
    """make(run) -> writes a state from the real one with the given changes."""
    def make(run, real):
        _, real_tensors, real_metadata = real
        meta = real_metadata | {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata_changes.items()}
        save_file(tensors(dict(real_tensors)) if tensors else real_tensors, run / "state.safetensors", metadata=meta)
    return make


def train_config(real, **changes):
    return json.loads(real[2]["train_config"]) | changes


def replaced(name, value):
    def change(tensors):
        tensors[name] = value(tensors[name]) if callable(value) else value
        return {k: v for k, v in tensors.items() if v is not None}
    return change


CASES = [
    ("junk", lambda run, real: (run / "state.safetensors").write_bytes(b"junk" * 10), "not a readable training state"),
    ("header-is-a-list", lambda run, real: safetensors(run / "state.safetensors", [1]), "not a readable training state"),
    ("no-format", bent(format="other/1"), "not a ddpm-train state"),
    ("empty-train-config", bent(train_config="{}"), "train_config is empty"),
    ("train-config-a-list", bent(train_config="[1]"), "train_config is not a JSON dict"),
    ("train-config-not-json", bent(train_config="{lr: 1"), "train_config is not JSON"),
    ("no-preset", lambda run, real: bent(train_config={"lr": 1.0})(run, real), "no dataset"),
    ("lr-a-string", lambda run, real: bent(train_config=train_config(real, lr="abc"))(run, real),
     "--lr 'abc' is not a number"),
    ("batch-a-float", lambda run, real: bent(train_config=train_config(real, batch_size=2.0))(run, real),
     "--batch-size '2.0' is not an integer"),
    ("unknown-field", lambda run, real: bent(train_config=train_config(real, evil=1))(run, real), "unknown field 'evil'"),
    ("step-not-a-number", bent(step="-3"), "no step count"),
    ("step-past-the-end", bent(step="99"), "past --steps"),
    ("other-model", bent(model_config=json.dumps({"ch": 64})), "different model or dataset"),
    ("weight-shape", bent(replaced("model.conv_in.weight", torch.zeros(2, 2))), "do not have the shapes"),
    ("weight-missing", bent(replaced("ema.conv_out.bias", None)), "do not have the shapes"),
    ("nan-weight", bent(replaced("ema.conv_out.bias", lambda t: torch.full_like(t, float("nan")))), "NaN or inf"),
    ("optimizer-key", bent(lambda t: t | {"optimizer.x.exp_avg": torch.zeros(1)}), "invalid optimizer state"),
    ("optimizer-moment-shape", bent(replaced("optimizer.0.exp_avg", torch.zeros(7, 7))), "optimizer state does not fit"),
    ("optimizer-groups", bent(optimizer_param_groups='{"a": 1}'), "optimizer_param_groups is not a JSON list"),
]


@pytest.mark.parametrize("name, make, message", CASES, ids=[c[0] for c in CASES])
def test_crafted_state(refused, tmp_path, real_run, name, make, message):
    run = tmp_path / "run"
    shutil.copytree(real_run[0], run)
    make(run, real_run)
    argv = ["--out", run, "--resume", "--device", "cpu", "--no-progress", "--sample-every", "0"]
    refused(train_main, argv, tmp_path, message, seconds=20.0)


def test_state_claiming_huge_tensors_is_refused_before_allocating(refused, tmp_path, real_run):
    run = tmp_path / "run"
    shutil.copytree(real_run[0], run)
    header = {"__metadata__": real_run[2],
              "model.conv_in.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}
    safetensors(run / "state.safetensors", header, b"\0" * 64)
    refused(train_main, ["--out", run, "--resume", "--device", "cpu", "--no-progress"], tmp_path,
            "not a readable training state", seconds=10.0)
