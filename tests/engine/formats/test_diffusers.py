"""diffusers UNet2DModel folders <-> our checkpoints, with diffusers itself as the oracle.

Random-weight diffusers models (GroupNorm affine parameters randomised too, so a swapped norm
shows) are written with save_pretrained, converted by engine.formats.diffusers_format, and run through
our U-Net, our samplers and our backends; diffusers' own forward and DDIMScheduler give the
expected outputs. Small widths keep it fast; the block structure is that of the real configs.
"""

import inspect
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers", reason="the diffusers parity tests need diffusers (the `test` extra)")

from engine.apps.cli import main
from engine.backends import build_engine
from engine.config import PRESETS, DiffusionConfig
from engine.diffusion import make_betas
from engine.formats.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.formats.diffusers_format import (
    SCHEDULER_DEFAULTS,
    UNET_DEFAULTS,
    load_diffusers,
    model_config,
    save_diffusers,
)
from engine.formats.opener import open_checkpoint
from engine.generate import sample_tensor
from engine.model import UNet, count_parameters
from engine.noise import image_keys
from engine.sampler import SPACINGS
from engine.settings import SampleSettings

# google/ddpm-cifar10-32's config.json (the DDPM authors' CIFAR-10 model, converted by diffusers).
DDPM_CIFAR10 = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
                  "clip_sample": True, "num_train_timesteps": 1000, "trained_betas": None, "variance_type": "fixed_small"}
CONFIGS = {
    # The same structure as DDPM_CIFAR10 (attention at 16x16, bottom/right padding, eps 1e-6), narrower.
    "ddpm-cifar10": {**DDPM_CIFAR10, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 16},
    "class-conditional": {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": [32, 64], "layers_per_block": 1,
                          "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
                          "up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "num_class_embeds": 5,
                          "downsample_padding": 1, "norm_eps": 1e-5, "norm_num_groups": 8},
    "attention-at-two-resolutions": {**DDPM_CIFAR10, "sample_size": 16, "block_out_channels": [16, 32, 48],
                                     "layers_per_block": 1, "norm_num_groups": 8,
                                     "down_block_types": ["AttnDownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                                     "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"]},
}
FORWARD_TOLERANCE = 1e-5  # max |ours - diffusers| / max |diffusers|, fp32
TRAJECTORY_TOLERANCE = 1e-4


def relative_error(out, ref):
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def randomise_norms(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.weight.data = 1 + 0.3 * torch.randn(module.weight.shape, generator=g)
            module.bias.data = 0.3 * torch.randn(module.bias.shape, generator=g)
    return net


def diffusers_folder(config, folder, scheduler=None, seed=0):
    """A random-weight UNet2DModel written by diffusers itself (and its scheduler config)."""
    torch.manual_seed(seed)
    net = randomise_norms(diffusers.UNet2DModel.from_config(config).eval(), seed)
    net.save_pretrained(folder)
    if scheduler is not None:
        diffusers.DDPMScheduler.from_config(scheduler).save_pretrained(folder)
    return net


def inputs(config, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(batch, config["in_channels"], size, size, generator=g)
    t = torch.tensor([0, 999, *torch.randint(0, 1000, (batch - 2,), generator=g).tolist()])
    classes = config.get("num_class_embeds")
    y = None if classes is None else torch.randint(0, classes, (batch,), generator=g)
    return x, t, y


def our_labels(y, batch, config):
    """diffusers' class labels, or for an unconditional model its one label, 0."""
    return torch.zeros(batch, dtype=torch.long) if y is None else y


def same_betas(scheduler, diffusion):
    """diffusers' betas (float32) are ours (float64) to float32 rounding."""
    return torch.allclose(scheduler.betas.double(), make_betas(diffusion), rtol=1e-6, atol=0)


@torch.no_grad()
def diffusers_eps(net, x, t, y):
    return net(x, t, class_labels=y).sample


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request, tmp_path_factory):
    """(name, diffusers config, the diffusers model, its folder, our Checkpoint of it)."""
    folder = tmp_path_factory.mktemp(request.param)
    net = diffusers_folder(CONFIGS[request.param], folder, DDPM_SCHEDULER)
    return request.param, CONFIGS[request.param], net, folder, load_diffusers(folder)


def test_our_defaults_tables_are_diffusers_own():
    """A config.json may leave fields out: we must read them as diffusers does."""
    signature = inspect.signature(diffusers.UNet2DModel.__init__).parameters
    defaults = {name: p.default for name, p in signature.items() if name != "self"}
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in defaults.items()} == UNET_DEFAULTS
    scheduler = inspect.signature(diffusers.DDPMScheduler.__init__).parameters
    assert {k: scheduler[k].default for k in SCHEDULER_DEFAULTS} == SCHEDULER_DEFAULTS


def test_ddpm_cifar10_is_our_preset_with_its_padding_and_eps():
    config, names = model_config(DDPM_CIFAR10)
    assert names == ()
    assert config == replace(PRESETS["ddpm-cifar10"], dropout=0.0, num_classes=0, learned_null=False,
                             downsample_padding=0, norm_eps=1e-6)
    with torch.device("meta"):
        ours = count_parameters(UNet(config))
        theirs = count_parameters(diffusers.UNet2DModel.from_config(DDPM_CIFAR10))
    assert theirs == 35_746_307
    assert ours == theirs + config.time_embed_dim  # plus our (zero) null-class row


def test_forward_matches_diffusers(imported):
    name, config, net, _, ckpt = imported
    x, t, y = inputs(config)
    ref = diffusers_eps(net, x, t, y)
    with torch.no_grad():
        out = ckpt.model(x, t, our_labels(y, len(x), config))
    error = relative_error(out, ref)
    print(f"{name}: forward max relative error {error:.2e}")
    assert error <= FORWARD_TOLERANCE, error


def test_export_back_to_diffusers_is_exact(imported, tmp_path):
    """Ours -> diffusers gives back diffusers' tensors bit for bit, and both its loaders read the folder."""
    _, _, net, _, ckpt = imported
    save_diffusers(ckpt, tmp_path)
    back = diffusers.UNet2DModel.from_pretrained(tmp_path).eval()
    original = net.state_dict()
    assert back.state_dict().keys() == original.keys()
    for key, value in back.state_dict().items():
        assert torch.equal(value, original[key]), key
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert same_betas(scheduler, ckpt.diffusion)
    assert load_diffusers(tmp_path).config == ckpt.config


def test_our_model_with_a_learned_null_class_round_trips(tmp_path, capsys):
    """Our class-conditional model -> diffusers (the null class is its last class embedding) -> ours."""
    torch.manual_seed(3)
    config = replace(PRESETS["tiny"], image_size=16, num_classes=3, downsample_padding=0, norm_eps=1e-6)
    model = randomise_norms(UNet(config).eval(), 3)
    save_checkpoint(tmp_path / "ours.safetensors", model, DiffusionConfig(beta_schedule="cosine"), ("a", "b", "c"))
    assert main(["convert", str(tmp_path / "ours.safetensors"), "--to-diffusers", str(tmp_path / "hf")]) == 0
    net = diffusers.UNet2DModel.from_pretrained(tmp_path / "hf").eval()
    assert net.config.num_class_embeds == 4
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([0, 5, 500, 999])
    y = torch.tensor([0, 1, 2, 3])  # 3: the null class
    with torch.no_grad():
        assert relative_error(model(x, t, y), diffusers_eps(net, x, t, y)) <= FORWARD_TOLERANCE
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "hf")
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert same_betas(scheduler, DiffusionConfig(beta_schedule="cosine"))
    # It samples as `ddpm-engine sample --sampler ddpm` does by default: our dynamic thresholding, uncapped.
    threshold = SampleSettings().threshold
    assert scheduler.config.thresholding and scheduler.config.dynamic_thresholding_ratio == threshold > 0
    assert scheduler.config.sample_max_value > 100 and not scheduler.config.clip_sample
    capsys.readouterr()
    assert main(["convert", "--from-diffusers", str(tmp_path / "hf"), "--out", str(tmp_path / "back.safetensors")]) == 0
    assert f"--sampler ddpm --variance large --threshold {threshold}" in capsys.readouterr().out
    back = load_checkpoint(tmp_path / "back.safetensors")
    assert (back.config, back.class_names, back.diffusion) == (config, ("a", "b", "c"), DiffusionConfig(beta_schedule="cosine"))
    for key, value in back.model.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_imported_checkpoint_file_matches_diffusers(imported, tmp_path, capsys):
    """convert --from-diffusers writes a .safetensors checkpoint that loads unchanged."""
    _, config, net, folder, _ = imported
    out = tmp_path / "model.safetensors"
    assert main(["convert", "--from-diffusers", str(folder), "--out", str(out)]) == 0
    assert "--sampler ddpm --variance small --clip-x0" in capsys.readouterr().out  # DDPM_SCHEDULER's sampling
    x, t, y = inputs(config, seed=2)
    with torch.no_grad():
        out_eps = load_checkpoint(out).model(x, t, our_labels(y, len(x), config))
    assert relative_error(out_eps, diffusers_eps(net, x, t, y)) <= FORWARD_TOLERANCE


def test_attention_weights_under_their_pre_0_15_names(tmp_path):
    """The hub's google/ddpm-* files name attention weights query/key/value/proj_attn."""
    config = CONFIGS["ddpm-cifar10"]
    net = diffusers_folder(config, tmp_path)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        for new, previous in old.items():
            key = key.replace(f".{new}.", f".{previous}.")
        renamed[key] = value
    assert renamed.keys() != tensors.keys()
    save_file(renamed, tmp_path / "diffusion_pytorch_model.safetensors")
    x, t, y = inputs(config)
    with torch.no_grad():
        out = load_diffusers(tmp_path).model(x, t, our_labels(y, len(x), config))
    assert relative_error(out, diffusers_eps(net, x, t, y)) <= FORWARD_TOLERANCE


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_scheduler_betas_match_diffusers(tmp_path, schedule):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule=schedule, beta_end=0.03)
    scheduler.save_pretrained(tmp_path)
    diffusers_folder(CONFIGS["class-conditional"], tmp_path)
    diffusion = load_diffusers(tmp_path).diffusion
    assert diffusion.num_timesteps == 500
    assert same_betas(scheduler, diffusion)


@pytest.mark.parametrize("T, steps, spacing", [(100, 100, None), (1000, 10, "leading"), (1000, 10, "trailing")])
def test_ddim_trajectory_matches_diffusers(tmp_path, T, steps, spacing):
    """Deterministic DDIM from the same x_T: diffusers' DDIMScheduler against our sampler.

    DDIMScheduler.step goes from t to t - T // S whatever its timestep_spacing, so its S-step
    trajectory is a DDIM trajectory over its own timesteps for "leading" and "trailing" spacing (T a
    multiple of S), and for "linspace" (our original "uniform") only when S = T: at S = T every
    spacing takes every timestep, which is compared with our default spacing. The S < T cases need
    our spacing of diffusers' name (skipped where engine.sampler does not have it).
    """
    if spacing is not None and spacing not in SPACINGS:
        pytest.skip(f"our sampler has no {spacing!r} timestep spacing (engine.sampler.SPACINGS)")
    config = CONFIGS["class-conditional"]
    net = diffusers_folder(config, tmp_path, {**DDPM_SCHEDULER, "num_train_timesteps": T})
    ckpt = open_checkpoint(tmp_path)  # a folder: routed to the converter
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", clip_sample=False,
                                        set_alpha_to_one=True, timestep_spacing=spacing or "linspace", steps_offset=0)
    scheduler.set_timesteps(steps)
    settings = SampleSettings(sampler="ddim", steps=steps, eta=0.0, guidance=0.0, threshold=0.0)
    settings = settings if spacing is None else replace(settings, spacing=spacing)
    engine = build_engine(ckpt, "eager")
    assert scheduler.timesteps.tolist() == settings.plan(ckpt.diffusion).timesteps.flip(0).tolist()
    g = torch.Generator().manual_seed(5)
    x_T = torch.randn(2, 3, 16, 16, generator=g)
    y = torch.tensor([1, 4])
    x = x_T
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(net(x, t, class_labels=y).sample, t, x, eta=0.0).prev_sample
    ours = sample_tensor(engine, settings, y, image_keys(0, torch.arange(2)), x_T)
    error = relative_error(ours, x)
    print(f"DDIM trajectory, T = {T}, {steps} steps, {spacing or 'default'} spacing: max relative error {error:.2e}")
    assert error <= TRAJECTORY_TOLERANCE, error


def test_onnx_export_of_an_imported_model_matches_diffusers(tmp_path):
    pytest.importorskip("onnxruntime")
    from engine.formats.onnx import load_onnx
    from engine.formats.onnx_export import export_onnx

    config = CONFIGS["ddpm-cifar10"]
    net = diffusers_folder(config, tmp_path / "hf")
    export_onnx(load_diffusers(tmp_path / "hf"), tmp_path / "model.onnx")
    x, t, y = inputs(config)
    out = load_onnx(tmp_path / "model.onnx").model(x, t, our_labels(y, len(x), config))
    assert relative_error(out, diffusers_eps(net, x, t, y)) <= 1e-4


def test_fused_model_of_an_imported_model_matches_diffusers(tmp_path):
    """The fused U-Net reads the imported eps and padding (Triton interpreter on the CPU)."""
    from engine.fused import fuse

    config = {**CONFIGS["ddpm-cifar10"], "sample_size": 8, "block_out_channels": [16, 16], "layers_per_block": 1,
              "norm_num_groups": 8, "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
              "up_block_types": ["AttnUpBlock2D", "UpBlock2D"]}
    net = diffusers_folder(config, tmp_path)
    ckpt = load_diffusers(tmp_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, t, y = inputs(config, batch=2)
    fused = fuse(ckpt.model.to(device), torch.float32)
    out = fused(x.to(device), t.to(device), our_labels(y, len(x), config).to(device)).cpu()
    assert relative_error(out, diffusers_eps(net, x, t, y)) <= 1e-4


@pytest.mark.parametrize("change, field", [
    ({"flip_sin_to_cos": True}, "flip_sin_to_cos"),
    ({"freq_shift": 0}, "freq_shift"),
    ({"attention_head_dim": 8}, "attention_head_dim"),
    ({"resnet_time_scale_shift": "scale_shift"}, "resnet_time_scale_shift"),
    ({"class_embed_type": "timestep"}, "class_embed_type"),
    ({"up_block_types": ["UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]}, "up_block_types"),
    ({"downsample_padding": 2}, "downsample_padding"),
    ({"out_channels": 6}, "out_channels"),
    ({"sample_size": [32, 16]}, "sample_size"),
    ({"block_out_channels": [128, 192, 256, 256]}, "block_out_channels"),
    ({"cross_attention_dim": 768}, "cross_attention_dim"),
    ({"_class_name": "UNet2DConditionModel"}, "_class_name"),
])
def test_unrepresentable_configs_are_refused_naming_the_field(change, field):
    with pytest.raises(CheckpointError, match=field) as error:
        model_config({**DDPM_CIFAR10, **change})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("change, field", [
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"beta_schedule": "scaled_linear"}, "beta_schedule"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
])
def test_unrepresentable_schedulers_are_refused_naming_the_field(tmp_path, capsys, change, field):
    diffusers_folder(CONFIGS["class-conditional"], tmp_path)
    with open(tmp_path / "scheduler_config.json", "w") as f:
        json.dump({**DDPM_SCHEDULER, **change}, f)
    assert main(["convert", "--from-diffusers", str(tmp_path), "--out", str(tmp_path / "x.safetensors")]) == 1
    err = capsys.readouterr().err
    assert field in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def test_pickled_weights_only_is_one_line(tmp_path, capsys):
    diffusers_folder(CONFIGS["class-conditional"], tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors").rename(tmp_path / "diffusion_pytorch_model.bin")
    assert main(["sample", "--checkpoint", str(tmp_path), "--device", "cpu", "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.bin" in err and "save_pretrained" in err and err.count("\n") == 1, err


def test_sample_an_unconditional_diffusers_folder(tmp_path, capsys):
    """--checkpoint DIR samples a diffusers folder; an unconditional model refuses guidance and classes."""
    folder = tmp_path / "hf"
    diffusers_folder(CONFIGS["attention-at-two-resolutions"], folder, {**DDPM_SCHEDULER, "num_train_timesteps": 20})
    common = ["--checkpoint", str(folder), "--device", "cpu", "--no-progress", "--steps", "2", "-n", "2"]
    assert main(["sample", *common, "--guidance", "1", "--out", str(tmp_path / "a")]) == 1
    assert "--guidance: must be 0 (this model is unconditional)" in capsys.readouterr().err
    assert main(["sample", *common, "--classes", "0", "--out", str(tmp_path / "b")]) == 1
    assert "unconditional" in capsys.readouterr().err
    assert main(["sample", *common, "--out", str(tmp_path / "c")]) == 0  # guidance defaults to 0 here
    assert (tmp_path / "c" / "samples.npz").is_file()


def test_a_foreign_class_conditional_model_refuses_guidance(tmp_path, capsys):
    folder = tmp_path / "hf"
    diffusers_folder(CONFIGS["class-conditional"], folder, {**DDPM_SCHEDULER, "num_train_timesteps": 20})
    ckpt = load_diffusers(folder)
    assert (ckpt.config.num_classes, ckpt.config.learned_null, ckpt.class_names) == (5, False, tuple("01234"))
    common = ["--checkpoint", str(folder), "--device", "cpu", "--no-progress", "--steps", "2", "-n", "2"]
    assert main(["sample", *common, "--guidance", "2", "--out", str(tmp_path / "a")]) == 1
    assert "no learned null class" in capsys.readouterr().err
    assert main(["sample", *common, "--classes", "3", "--out", str(tmp_path / "b")]) == 0


BLOCKED = r'''
import sys


class Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("diffusers", "huggingface_hub", "transformers", "accelerate"):
            raise ModuleNotFoundError(f"No module named {name!r}")


sys.meta_path.insert(0, Missing())
for name in [m for m in sys.modules if m.split(".")[0] in ("diffusers", "huggingface_hub")]:
    del sys.modules[name]
from engine.apps.cli import main

folder = sys.argv[1]
assert main(["convert", "--from-diffusers", folder + "/hf", "--out", folder + "/m.safetensors"]) == 0
assert main(["convert", folder + "/m.safetensors", "--to-diffusers", folder + "/back"]) == 0
print("converted without diffusers")
'''


def test_conversion_needs_no_diffusers(tmp_path):
    """diffusers is a test-only dependency: the converter reads and writes the files itself."""
    diffusers_folder(CONFIGS["class-conditional"], tmp_path / "hf", DDPM_SCHEDULER)
    root = Path(__file__).resolve().parents[3]
    result = subprocess.run([sys.executable, "-c", BLOCKED, str(tmp_path)], cwd=root, capture_output=True, text=True,
                            check=False,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "converted without diffusers" in result.stdout
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json"):
        assert (tmp_path / "back" / name).is_file(), name
