import dataclasses
import json

import pytest

from engine.config import MAX_PARAMETERS, PRESETS, DiffusionConfig, ModelConfig
from engine.model import UNet, count_parameters


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid_and_under_their_parameter_bound(name):
    config = PRESETS[name]
    config.validate()
    assert count_parameters(UNet(config)) <= config.parameter_bound() < 3 * count_parameters(UNet(config))


@pytest.mark.parametrize("changes, message", [
    ({"ch": 32.0}, "ch must be an integer, not 32.0"),
    ({"ch": True}, "ch must be an integer, not True"),
    ({"num_groups": 0}, "num_groups 0 is out of range"),
    ({"num_classes": 10**9}, "num_classes 1000000000 is out of range"),
    ({"image_size": "32"}, "image_size must be an integer"),
    ({"ch_mult": (1, 2.0)}, "ch_mult must be an integer"),
    ({"ch_mult": ()}, "at least one level"),
    ({"ch_mult": [1, 2]}, "ch_mult must be a list"),
    ({"attn_resolutions": (512,)}, "attn_resolutions 512 is out of range"),
    ({"dropout": float("nan")}, "dropout must be a finite number"),
    ({"dropout": 1.0}, "dropout 1.0 is out of range"),
    ({"patch_size": 0}, "patch_size 0 is out of range"),
    ({"ch": 4096, "num_groups": 32}, "parameters, over the limit"),
    ({"image_size": 1024}, "the middle block would attend over 512 x 512 positions"),
])
def test_model_config_refuses_bad_types_and_ranges(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        dataclasses.replace(PRESETS["tiny"], **changes).validate()


def test_parameter_bound_is_a_bound_near_the_limit():
    # A config just under the limit is allowed; it is refused without building it.
    config = dataclasses.replace(PRESETS["tiny"], ch=1024, num_groups=32)
    assert config.parameter_bound() < MAX_PARAMETERS
    config.validate()


@pytest.mark.parametrize("changes, message", [
    ({"num_timesteps": 1000.5}, "num_timesteps must be an integer"),
    ({"num_timesteps": 0}, "out of range"),
    ({"num_timesteps": 10**9}, "out of range"),
    ({"beta_schedule": "sigmoid"}, "unknown beta schedule"),
    ({"beta_start": "1e-4"}, "beta_start must be a finite number"),
    ({"beta_end": float("inf")}, "beta_end must be a finite number"),
    ({"beta_start": 0.5, "beta_end": 0.1}, "beta_start <= beta_end"),
])
def test_diffusion_config_refuses_bad_types_and_ranges(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(DiffusionConfig(), **changes).validate()


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a JSON object"),
    ('"ch"', "must be a JSON object"),
    ('{"ch": 32, "evil": 1}', "unknown ModelConfig field 'evil'"),
    ('{"ch_mult": 5}', "ch_mult must be a list"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
])
def test_from_json_refuses_what_is_not_a_config_object(text, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_json(text)


def test_json_round_trip():
    for config in PRESETS.values():
        assert ModelConfig.from_json(config.to_json()) == config
    assert DiffusionConfig.from_json(json.dumps({"num_timesteps": 10})) == DiffusionConfig(num_timesteps=10)
