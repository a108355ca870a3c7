"""--resume keeps the run's settings; flag values are checked once, whatever made the config."""

import argparse
import dataclasses
import json
import math
import re

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.cli import build_parser
from training.cli import main as train_main
from training.config import FIELD_RANGES, TrainConfig, check_config
from training.state import load_state

FAST = ["--device", "cpu", "--no-progress", "--sample-every", "0"]


def train_cli(out, *argv):
    return train_main([*FAST, "--out", str(out), *argv])


def saved(out) -> dict:
    return load_state(out / "state.safetensors").train_config


def test_resume_keeps_checkpoint_and_log_intervals_unless_given_again(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--preset", "tiny", "--dataset", "synthetic", "--steps", "2", "--batch-size", "2",
                     "--checkpoint-every", "1", "--log-every", "1", "--lr-schedule", "constant") == 0
    assert train_cli(out, "--resume", "--steps", "3") == 0
    assert (saved(out)["checkpoint_every"], saved(out)["log_every"]) == (1, 1)  # not the defaults 1000 and 10
    with open(out / "log.csv") as f:
        assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["1", "2", "3"]
    assert train_cli(out, "--resume", "--steps", "4", "--log-every", "7") == 0
    assert (saved(out)["checkpoint_every"], saved(out)["log_every"]) == (1, 7)
    assert "warning" not in capsys.readouterr().err  # a constant schedule does not change with the length


def test_resume_with_another_length_warns_once_about_the_cosine_schedule(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--preset", "tiny", "--dataset", "synthetic", "--steps", "2", "--batch-size", "2",
                     "--warmup-epochs", "0") == 0
    capsys.readouterr()
    assert train_cli(out, "--resume") == 0  # the same length: nothing to say
    assert capsys.readouterr().err == ""
    assert train_cli(out, "--resume", "--steps", "4") == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: the run was 2 steps long and is now 4")
    # At step 2 of 2 the cosine had reached 0; stretched to 4 steps it is back at half the peak.
    assert "learning rate at step 2: 0 -> 0.0001" in err[0]
    assert saved(out)["steps"] == 4


@pytest.mark.parametrize("changes, message", [
    ({"lr": "abc"}, "--lr 'abc' is not a number"),
    ({"batch_size": 3.0}, "--batch-size '3.0' is not an integer"),
    ({"steps": True}, "--steps 'True' is not a number"),
    ({"p_uncond": float("nan")}, "--p-uncond nan is not a finite number"),
    ({"ema_decay": 1.0}, "--ema-decay 1 is out of range [0, 1)"),
    ({"lr_schedule": "linear"}, "--lr-schedule 'linear' is not one of constant, cosine, cooldown"),
    ({"preset": None}, "--preset 'None' is not one of"),
    ({"compile": "yes"}, "--compile 'yes' is not a flag"),
    ({"steps": 5, "epochs": 2.0}, "not both"),
    ({"fid_every": 5}, "--fid-every needs --fid-ref"),
    ({"lr_schedule": "cooldown", "cooldown_start": 10, "cooldown_steps": 0}, "--cooldown-steps 0 is out of range [1, inf]"),
    ({"lr_schedule": "cooldown", "cooldown_start": -1, "cooldown_steps": 5}, "--cooldown-start -1 is out of range [0, inf]"),
    ({"lr_schedule": "cooldown", "cooldown_start": 10, "cooldown_steps": 5, "cooldown_shape": "cubic"},
     "--cooldown-shape 'cubic' is not one of 1-sqrt, linear"),
    ({"lr_schedule": "cooldown", "cooldown_steps": 5}, "--lr-schedule cooldown needs --cooldown-start STEP and --cooldown-steps N"),
    ({"lr_schedule": "cooldown", "cooldown_start": 10}, "--lr-schedule cooldown needs --cooldown-start STEP and"),
    ({"cooldown_start": 10, "cooldown_steps": 5}, "--cooldown-start needs --lr-schedule cooldown"),
    ({"lr_schedule": "constant", "cooldown_shape": "linear"}, "--cooldown-shape needs --lr-schedule cooldown"),
    ({"lr_schedule": "cooldown", "cooldown_start": 10, "cooldown_steps": 5, "steps": 20},
     "a cooldown run ends where its decay does, at step 15 (--cooldown-start + --cooldown-steps): give no --steps/--epochs, or --steps 15"),
    ({"lr_schedule": "cooldown", "cooldown_start": 10, "cooldown_steps": 5, "epochs": 1.0}, "at step 15"),
])
def test_check_config_refuses_bad_types_and_ranges(changes, message):
    config = dataclasses.replace(TrainConfig(preset="tiny", dataset="synthetic", out="x"), **changes)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        check_config(config)
    assert "\n" not in str(e.value)


def test_flag_types_and_check_config_are_one_definition(capsys):
    # Every numeric TrainConfig field is a flag checked by its FIELD_RANGES entry, the one check_config applies:
    # a value past either end is refused by both, in the same words.
    numeric = {f.name for f in dataclasses.fields(TrainConfig) if f.type.split(" |")[0] in ("int", "float")}
    assert set(FIELD_RANGES) == numeric
    actions = {a.dest: a for a in build_parser()._actions}
    base = TrainConfig(preset="tiny", dataset="synthetic", out="x")
    cooldown = {"lr_schedule": "cooldown", "cooldown_start": 0, "cooldown_steps": 1}
    for name, values in FIELD_RANGES.items():
        context = cooldown if name in cooldown else {}  # the cooldown's fields need its schedule
        outside = [values.lo - 1] + ([values.hi + 1] if values.hi is not None else [])
        outside.append(values.lo + 0.5 if values.kind is int else math.inf)
        for value in outside:
            with pytest.raises(argparse.ArgumentTypeError) as flag:
                actions[name].type(str(value))
            with pytest.raises(ValueError, match=re.escape(f"--{name.replace('_', '-')} {flag.value}")):
                check_config(dataclasses.replace(base, **{**context, name: value}))
        inside = actions[name].type(str(values.lo + 0.5 if values.lo_open else values.lo))
        assert type(inside) is values.kind
        check_config(dataclasses.replace(base, **{**context, name: inside}, fid_ref="ref.npz"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--out", "x", "--p-uncond", "1.5"])
    assert "1.5 is out of range [0, 1]" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--p-uncond 1.5 is out of range \[0, 1\]"):
        check_config(TrainConfig(preset="tiny", dataset="synthetic", out="x", p_uncond=1.5))


def test_state_with_a_bad_train_config_is_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_cli(out, "--preset", "tiny", "--dataset", "synthetic", "--steps", "1", "--batch-size", "2") == 0
    state = out / "state.safetensors"
    tensors = load_file(str(state))
    with safe_open(str(state), "pt") as f:
        metadata = f.metadata()
    capsys.readouterr()
    for train_config, message in [("{}", "train_config is empty"), ("[]", "train_config is not a JSON dict"),
                                  ('{"lr": 1}', "training config is invalid (no dataset)"),
                                  (json.dumps({**json.loads(metadata["train_config"]), "lr": -1}),
                                   "training config is invalid (--lr -1 is out of range"),
                                  (json.dumps({**json.loads(metadata["train_config"]), "evil": 1}),
                                   "unknown field 'evil'")]:
        save_file(tensors, state, metadata={**metadata, "train_config": train_config})
        assert train_cli(out, "--resume", "--steps", "2") == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and message in err, err


def test_batch_larger_than_the_data_set_is_refused(tmp_path, capsys):
    assert train_cli(tmp_path / "run", "--preset", "tiny", "--dataset", "synthetic", "--steps", "1",
                     "--batch-size", "100000") == 1
    err = capsys.readouterr().err
    assert err.strip() == "ddpm-train: error: --batch-size 100000 is more than the 1000 images of the data set"
    assert not (tmp_path / "run").exists()
