"""Streaming sample output: shards written as they finish, memory flat in n, an interrupted run
continued by the same command, another run's leftovers refused."""

import tracemalloc

import numpy as np

import engine.apps.cli
from engine.apps.cli import main
from engine.formats.images import SampleRun


def sample(checkpoint, out, *extra):
    return main(["sample", "--device", "cpu", "--checkpoint", str(checkpoint), "--out", str(out), "--no-progress",
                 "--steps", "2", "-n", "5", "--batch-size", "2", "--backend", "eager", *map(str, extra)])


def test_an_interrupted_run_continues_where_it_stopped(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine.apps.cli, "SHARD_IMAGES", 2)  # shards [0, 2), [2, 4), [4, 5)
    assert sample(checkpoint, tmp_path / "straight") == 0
    expected = np.load(tmp_path / "straight" / "samples.npz")

    calls = []
    real = engine.apps.cli.generate

    def interrupted_in_the_second_shard(eng, settings, indices, *args, **kwargs):
        calls.append(indices.tolist())
        if int(indices[0]) == 2:
            raise KeyboardInterrupt
        return real(eng, settings, indices, *args, **kwargs)

    monkeypatch.setattr(engine.apps.cli, "generate", interrupted_in_the_second_shard)
    out = tmp_path / "out"
    assert sample(checkpoint, out) == 130
    assert "same command continues" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in (tmp_path / "out.partial" / "shards").iterdir()) == [
        "000000000.npz"]

    calls.clear()

    def counted(eng, settings, indices, *args, **kwargs):
        calls.append(indices.tolist())
        return real(eng, settings, indices, *args, **kwargs)

    monkeypatch.setattr(engine.apps.cli, "generate", counted)
    assert sample(checkpoint, out) == 0
    assert calls == [[2, 3], [4]]  # the first shard was not sampled again
    assert "continued a run that had 2" in capsys.readouterr().out
    got = np.load(out / "samples.npz")
    assert np.array_equal(got["x"], expected["x"]) and np.array_equal(got["y"], expected["y"])
    assert not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:06d}.png" for i in range(5)]


def test_leftovers_of_another_run_are_refused(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engine.apps.cli, "SHARD_IMAGES", 2)
    real = engine.apps.cli.generate

    def interrupt_late(eng, settings, indices, *args, **kwargs):
        if int(indices[0]) == 4:
            raise KeyboardInterrupt
        return real(eng, settings, indices, *args, **kwargs)

    monkeypatch.setattr(engine.apps.cli, "generate", interrupt_late)
    assert sample(checkpoint, tmp_path / "out") == 130
    monkeypatch.setattr(engine.apps.cli, "generate", real)
    capsys.readouterr()
    assert sample(checkpoint, tmp_path / "out", "--seed", 1) == 1  # another seed: other images
    err = capsys.readouterr().err
    assert "unfinished run with other settings" in err and len(err.strip().splitlines()) == 1
    assert len(list((tmp_path / "out.partial" / "shards").iterdir())) == 2  # kept, not mixed or deleted


def test_finish_streams_the_shards(tmp_path):
    """samples.npz is assembled shard by shard: the peak memory of finish() is a few shards, not the run."""
    n, shard = 20_000, 1000
    run = SampleRun(tmp_path / "out", n, list(range(10)), shard, {"seed": 0})
    run.open()
    rng = np.random.default_rng(0)
    first = None
    for start, stop in run.shards():  # shards written directly (no PNGs: 20k of them would be slow)
        x = rng.integers(0, 256, (stop - start, 16, 16, 3), dtype=np.uint8)
        first = x if first is None else first
        np.savez(run.shard_path(start), x=x, y=np.arange(start, stop) % 10)
    (run.work / "images" / "000000.png").write_bytes(b"")
    tracemalloc.start()
    run.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = n * 16 * 16 * 3  # 15 MB of images
    assert peak < total / 3, (peak, total)
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["x"].shape == (n, 16, 16, 3) and np.array_equal(data["x"][:shard], first)
    assert np.array_equal(data["y"], np.arange(n) % 10)
    assert not run.work.exists()
