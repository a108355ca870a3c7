import json
import math

import pytest
import torch
from safetensors.torch import save_file

from engine.config import PRESETS, DiffusionConfig
from engine.formats.checkpoint import CheckpointError, expected_shapes, load_checkpoint, read_metadata, save_checkpoint
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


def test_loading_draws_no_random_initialisation(tiny):
    """The model is built on the meta device and the file's tensors assigned: no random numbers are
    drawn (they would only be overwritten), and every tensor is real, float32 and trainable."""
    _, path = tiny
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    ckpt = load_checkpoint(path)
    assert torch.equal(torch.random.get_rng_state(), state)
    tensors = list(ckpt.model.parameters()) + list(ckpt.model.buffers())
    assert all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
    assert all(p.requires_grad for p in ckpt.model.parameters()) and not ckpt.model.training


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

    monkeypatch.setattr("engine.formats.checkpoint.save_file", crash)
    with pytest.raises(RuntimeError):
        save_checkpoint(path, model, DiffusionConfig(), NAMES)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def write_raw(path, header: object, data: bytes = b"") -> None:
    """A .safetensors file with any JSON header: 8 bytes of length, the header, the data."""
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def good_metadata(**changes) -> dict[str, str]:
    model = json.loads(PRESETS["tiny"].to_json()) | changes
    return {"format": "ddpm-engine/1", "model_config": json.dumps(model),
            "diffusion_config": DiffusionConfig().to_json(), "class_names": json.dumps(list(NAMES))}


@pytest.mark.parametrize("header, message", [
    ([1, 2, 3], "not a safetensors file"),
    ({"__metadata__": "ddpm-engine/1"}, "not a ddpm-engine checkpoint"),
    ({"__metadata__": {"format": "ddpm-engine/1", "model_config": {"ch": 32}}}, "values must be strings"),
    ({"__metadata__": good_metadata(num_groups=0)}, "num_groups 0 is out of range"),
    ({"__metadata__": good_metadata(ch=32.0)}, "ch must be an integer, not 32.0"),
    ({"__metadata__": good_metadata(ch=True)}, "ch must be an integer, not True"),
    ({"__metadata__": good_metadata(num_classes=1e9)}, "num_classes must be an integer"),
    ({"__metadata__": good_metadata(num_classes=3)}, "10 class names for 3 classes"),
    ({"__metadata__": good_metadata(ch=4096, num_groups=32)}, "over the limit"),
    ({"__metadata__": {**good_metadata(), "diffusion_config": '{"num_timesteps": 1000.5}'}}, "num_timesteps must be"),
    ({"__metadata__": {**good_metadata(), "class_names": '"airplane"'}}, "class_names must be a list"),
    ({"__metadata__": {**good_metadata(), "class_names": json.dumps(["a"] * 10)}}, "class names repeat"),
    ({"__metadata__": {k: v for k, v in good_metadata().items() if k != "class_names"}}, "no 'class_names'"),
])
def test_crafted_headers_are_refused_in_one_line(tmp_path, header, message):
    path = tmp_path / "crafted.safetensors"
    write_raw(path, header)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_header_tensors_are_checked_against_the_config_before_anything_is_built(tmp_path, tiny, monkeypatch):
    model, path = tiny
    metadata = read_metadata(path)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}

    def header(**entries):
        offset, out = 0, {"__metadata__": metadata}
        for name, shape in shapes.items():
            entry = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + 4 * math.prod(shape)]}
            offset = entry["data_offsets"][1]
            out[name] = entry | entries.get(name, {})
        return out, offset

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the header was checked")

    # The real shapes, without a model: any UNet built while the header is bad fails the test.
    monkeypatch.setattr("engine.formats.checkpoint.UNet.__init__", built)
    monkeypatch.setattr("engine.formats.checkpoint.expected_shapes", lambda config: {k: tuple(v) for k, v in shapes.items()})
    bad = tmp_path / "bad.safetensors"
    for changes, message in [
        ({"conv_in.weight": {"shape": [32, 3, 5, 5]}}, "1 wrong-shape \\(e.g. conv_in.weight\\)"),
        ({"conv_in.weight": {"shape": [10**6, 10**6]}}, "wrong-shape"),
        ({"conv_in.weight": {"dtype": "I64"}}, "1 non-float"),
        ({"conv_in.weight": {"data_offsets": [0, 10**12]}}, "out-of-file"),
    ]:
        entries, size = header(**changes)
        write_raw(bad, entries, bytes(size))
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(bad)
    entries, size = header()
    write_raw(bad, entries, bytes(size - 4))  # the data is one float short of what the header says
    with pytest.raises(CheckpointError, match="out-of-file"):
        load_checkpoint(bad)


def test_non_finite_weights_are_refused(tmp_path, tiny):
    model, path = tiny
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    tensors["conv_out.bias"] = tensors["conv_out.bias"].clone()
    tensors["conv_out.bias"][1] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(tensors, bad, metadata=read_metadata(path))
    with pytest.raises(CheckpointError, match="NaN or inf \\(e.g. conv_out.bias\\)"):
        load_checkpoint(bad)


def test_expected_shapes_are_the_models_without_allocating():
    """... and skip nn.Embedding's initialisation on the meta device only."""
    config = PRESETS["ddpm-cifar10"]
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in UNet(config).state_dict().items()}
    torch.manual_seed(0)
    weight = torch.nn.Embedding(100, 8).weight
    assert 0.8 < weight.std().item() < 1.2  # N(0, 1), as nn.Embedding initialises
