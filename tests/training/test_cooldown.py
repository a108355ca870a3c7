"""--lr-schedule cooldown end to end: resumed mid-decay bit for bit, and a constant-rate run cooled as a
branch in a copy of its folder while the run itself goes on (tiny preset, synthetic data)."""

import shutil

import pytest
import torch

from tests.training.test_resume import saved, train_cli
from tests.training.test_train import Stop, log_rows, make_config, stop_at, weights
from training.state import load_state
from training.train import train

COOLDOWN = {"steps": None, "lr_schedule": "cooldown", "cooldown_start": 2, "cooldown_steps": 4}  # 6 steps


def test_resume_in_the_middle_of_the_cooldown_is_exact(tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "run"
    train(make_config(straight, **COOLDOWN))
    with pytest.raises(Stop):
        train(make_config(out, **COOLDOWN), on_step=stop_at(3))  # a checkpoint at step 3, one step into the decay
    assert load_state(out / "state.safetensors").step == 3
    assert saved(out)["steps"] == 6 and saved(out)["cooldown_shape"] == "1-sqrt"
    train(make_config(out, **COOLDOWN, resume=True))
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)  # weights, EMA, AdamW
    rows, straight_rows = log_rows(out), log_rows(straight)
    assert [(r["lr"], r["loss"]) for r in rows] == [(r["lr"], r["loss"]) for r in straight_rows]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[2] > lrs[3] > lrs[4] > lrs[5] > 0  # it did decay


def files(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Batch 2 of the 1000 synthetic images: 500 steps an epoch; a warm-up of 2 steps to the peak 1e-3.
RECIPE = ["--preset", "tiny", "--dataset", "synthetic", "--batch-size", "2", "--lr", "1e-3", "--warmup-multiplier",
          "1", "--warmup-epochs", "0.004", "--checkpoint-every", "2", "--log-every", "1", "--precision", "fp32"]
CONSTANT = [*RECIPE, "--lr-schedule", "constant"]


def test_a_constant_run_cooled_as_a_branch_of_a_copy(tmp_path, capsys):
    run, branch, scratch = tmp_path / "run", tmp_path / "branch", tmp_path / "scratch"
    assert train_cli(run, *CONSTANT, "--steps", "4") == 0
    before = files(run)
    shutil.copytree(run, branch)
    assert train_cli(branch, "--resume", "--lr-schedule", "cooldown", "--cooldown-start", "4",
                     "--cooldown-steps", "4") == 0
    assert files(run) == before  # the run itself is untouched
    config = saved(branch)
    assert (config["lr_schedule"], config["cooldown_start"], config["cooldown_steps"], config["steps"],
            config["cooldown_shape"]) == ("cooldown", 4, 4, 8, "1-sqrt")
    # The row of step d logs the rate of its update, at step d - 1: the warm-up, the peak, then 1 - sqrt(p).
    expected = [0, 5e-4, 1e-3, 1e-3] + [1e-3 * (1 - (k / 4) ** 0.5) for k in range(4)]
    rows = log_rows(branch)
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    # The branch is what a cooldown run from the start computes, bit for bit.
    assert train_cli(scratch, *RECIPE, "--lr-schedule", "cooldown", "--cooldown-start", "4", "--cooldown-steps", "4") == 0
    a, b = weights(scratch), weights(branch)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

    # Resumed again, the branch keeps its cooldown and its length without the flags.
    assert train_cli(branch, "--resume") == 0 and saved(branch)["steps"] == 8
    # The run goes on at its constant rate, and can be cooled again later, another way.
    assert train_cli(run, "--resume", "--steps", "6") == 0
    assert [float(r["lr"]) for r in log_rows(run)][4:] == [1e-3, 1e-3]
    later = tmp_path / "later"
    shutil.copytree(run, later)
    assert train_cli(later, "--resume", "--lr-schedule", "cooldown", "--cooldown-start", "6", "--cooldown-steps", "2",
                     "--cooldown-shape", "linear") == 0
    assert [float(r["lr"]) for r in log_rows(later)][6:] == pytest.approx([1e-3, 5e-4], rel=1e-5)
    capsys.readouterr()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_other_schedule_changes_on_resume_are_refused(tmp_path, capsys):
    constant, cosine, cooldown = tmp_path / "constant", tmp_path / "cosine", tmp_path / "cooldown"
    assert train_cli(constant, *CONSTANT, "--steps", "4") == 0
    assert train_cli(cosine, *RECIPE, "--lr-schedule", "cosine", "--steps", "2") == 0
    assert train_cli(cooldown, *RECIPE, "--lr-schedule", "cooldown", "--cooldown-start", "1", "--cooldown-steps", "1") == 0
    capsys.readouterr()
    cool = ["--lr-schedule", "cooldown", "--cooldown-steps", "4"]
    for out, argv, message in [
        (constant, [*cool, "--cooldown-start", "2"],
         "--cooldown-start 2 is before the run's step 4: a cooldown of a constant-rate run starts at or after"),
        (constant, ["--cooldown-start", "4"], "--cooldown-start needs --lr-schedule cooldown"),
        (constant, ["--lr-schedule", "cosine"], "--lr-schedule cosine differs from the run's constant"),
        (cosine, [*cool, "--cooldown-start", "2"], "--lr-schedule cooldown differs from the run's cosine"),
        (cooldown, ["--lr-schedule", "constant"], "--lr-schedule constant differs from the run's cooldown"),
        (cooldown, ["--cooldown-steps", "3"], "--cooldown-steps 3 differs from the run's 1"),
        (cooldown, ["--cooldown-shape", "linear"], "--cooldown-shape linear differs from the run's 1-sqrt"),
        (cooldown, ["--steps", "5"], "a cooldown run ends where its decay does, at step 2"),
    ]:
        assert train_cli(out, "--resume", *argv) == 1, argv
        assert message in one_error_line(capsys), argv
