import json

import pytest
import torch
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError, load_checkpoint, read_metadata, save_checkpoint
from engine.config import PRESETS, DiffusionConfig
from engine.model import UNet

NAMES = tuple(f"class{i}" for i in range(10))


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"]).eval()
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, model, DiffusionConfig(num_timesteps=500, beta_schedule="cosine"), NAMES)
    return model, path


def test_round_trip_rebuilds_the_model_from_the_file_alone(tiny):
    model, path = tiny
    assert path.stat().st_mode & 0o777 == 0o644
    ckpt = load_checkpoint(path)
    assert ckpt.model.config == model.config
    assert ckpt.diffusion == DiffusionConfig(num_timesteps=500, beta_schedule="cosine")
    assert ckpt.class_names == NAMES
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 400]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(ckpt.model(x, t, y), model(x, t, y))


def test_fp16_checkpoint_loads_in_float32(tmp_path, tiny):
    model, _ = tiny
    path = tmp_path / "half.safetensors"
    save_checkpoint(path, model, DiffusionConfig(), NAMES, dtype=torch.float16)
    assert path.stat().st_size < 0.6 * 4 * sum(p.numel() for p in model.state_dict().values())
    loaded = load_checkpoint(path).model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.allclose(loaded.conv_in.weight, model.conv_in.weight, atol=1e-3)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path, tiny):
    _, path = tiny
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)


def test_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(CheckpointError, match="not a ddpm-engine checkpoint"):
        load_checkpoint(plain)
    pickle_like = tmp_path / "model.pt"
    pickle_like.write_bytes(b"\x80\x04\x95" + bytes(200))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(pickle_like)


def test_tensors_that_do_not_match_the_config(tmp_path, tiny):
    model, path = tiny
    metadata = read_metadata(path)
    config = json.loads(metadata["model_config"])
    config["ch"] = 64
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    bad = tmp_path / "mismatch.safetensors"
    save_file(tensors, bad, metadata={**metadata, "model_config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="do not match its config"):
        load_checkpoint(bad)
    del tensors["conv_out.bias"]
    save_file(tensors, bad, metadata=metadata)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(bad)


def test_save_is_atomic(tmp_path, tiny, monkeypatch):
    model, path = tiny
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("engine.checkpoint.save_file", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, model, DiffusionConfig(), NAMES)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
