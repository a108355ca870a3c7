import pytest
import torch

from engine.config import PRESETS, ModelConfig
from engine.model import UNet, count_parameters, timestep_embedding


def test_ddpm_cifar10_has_the_papers_parameter_count():
    # Ho et al. 2020, Appendix B: 35.7M parameters for CIFAR-10; + (10 + 1) x 512 class embedding.
    n = count_parameters(UNet(PRESETS["ddpm-cifar10"]))
    assert 35.7e6 <= n - 11 * 512 < 35.8e6


def test_compact_preset_fits_the_size_budget():
    assert count_parameters(UNet(PRESETS["cifar10-compact"])) <= 8_000_000
    assert 100_000 <= count_parameters(UNet(PRESETS["tiny"])) < 1_000_000


@pytest.mark.parametrize("name", ["tiny", "cifar10-compact"])
def test_forward_shape_and_conditioning(name):
    torch.manual_seed(0)
    config = PRESETS[name]
    model = UNet(config).eval()
    for p in model.class_embed.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 3, config.image_size, config.image_size)
    t = torch.tensor([0, 500, 999])
    eps = model(x, t, torch.tensor([0, 1, config.null_class]))
    assert eps.shape == x.shape and eps.dtype == torch.float32
    # The class and the timestep both change the output.
    assert not torch.allclose(eps, model(x, t, torch.tensor([2, 2, 2])))
    assert not torch.allclose(eps, model(x, t.flip(0), torch.tensor([0, 1, config.null_class])))


def test_ddpm_stl10_is_the_same_network_at_64x64():
    # The report trains Ho et al.'s CIFAR-10 network on 64x64 STL-10: the same weights (35.7M + the
    # class embedding; convolutions do not depend on the resolution), attention at 16x16 (a third
    # level, as at 32x32 it was the second), 64x64 outputs.
    model = UNet(PRESETS["ddpm-stl10"]).eval()
    assert 35.7e6 <= count_parameters(model) - 11 * 512 < 35.8e6
    assert PRESETS["ddpm-stl10"].attn_resolutions == (16,)
    with torch.no_grad():
        eps = model(torch.zeros(1, 3, 64, 64), torch.tensor([10]), torch.tensor([0]))
    assert eps.shape == (1, 3, 64, 64)


def test_timestep_embedding_is_sinusoidal():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert torch.allclose(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    # Frequencies 10000^(-k / (half - 1)), k = 0..3.
    freqs = torch.tensor([10000 ** (-k / 3) for k in range(4)])
    assert torch.allclose(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]), atol=1e-6)


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="unknown preset"):
        ModelConfig.from_name("ddpm-imagenet")
    with pytest.raises(ValueError):
        UNet(ModelConfig(image_size=30))
    with pytest.raises(ValueError, match="at least 2 channels"):
        UNet(ModelConfig(ch=32, num_groups=32))


def test_patch_stem_runs_the_top_level_at_half_resolution():
    # patch_size 2: the image enters as 2x2 pixel blocks on 12 channels, the top level is 16x16, so
    # attention "at 8" sits one level down; the output is the image's shape again.
    config = ModelConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                         dropout=0.0, patch_size=2)
    model = UNet(config).eval()
    assert model.conv_in.in_channels == 12 and model.conv_out.out_channels == 12
    seen = []
    model.conv_in.register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    attn = [m for m in model.modules() if type(m).__name__ == "AttnBlock"]
    attn[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    x = torch.randn(2, 3, 32, 32)
    eps = model(x, torch.tensor([3, 900]), torch.tensor([0, 10]))
    assert eps.shape == x.shape
    assert seen[:2] == [16, 8]


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="patch_size"):
        UNet(ModelConfig(ch=32, ch_mult=(1, 2, 2, 2), num_groups=8, patch_size=2, image_size=24))
    with pytest.raises(ValueError, match="patch_size"):
        UNet(ModelConfig(ch=32, num_groups=8, patch_size=0))
