"""The one table of sampling fields (engine.settings.FIELDS): the CLI's flags and the server's parser are
made from it and agree on every value; a field refuses what is not one of its values, strictly."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest

from engine.apps.cli import build_parser
from engine.formats.checkpoint import load_checkpoint
from engine.settings import FIELDS, SETTINGS, FieldError, SampleSettings

serve = pytest.importorskip("engine.apps.serve", reason="the serve extra (pip install -e '.[serve]')")


def sample_parser():
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    return commands.choices["sample"]


def test_every_field_of_sample_settings_is_in_the_table_with_its_default():
    assert set(SETTINGS) == {f.name for f in fields(SampleSettings)}
    for name in SETTINGS:
        assert FIELDS[name].default == getattr(SampleSettings(), name)


def test_the_sample_command_has_a_flag_for_every_field_with_the_table_s_default():
    actions = {a.dest: a for a in sample_parser()._actions}
    for name, field in FIELDS.items():
        action = actions[name]
        assert action.option_strings[0] == "--" + name.replace("_", "-")
        expected = None if name == "guidance" else (0 if name == "seed" else field.default)
        assert action.default == expected, name  # guidance: the command's own default, resolved per model
        if field.choices:
            assert tuple(action.choices) == field.choices


def test_the_server_takes_every_field_of_the_table_and_its_defaults(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    assert serve.parse_job({}, ckpt, max_images=16).settings == SampleSettings()
    for name, field in FIELDS.items():
        default = 0 if name == "seed" else field.default
        job = serve.parse_job({name: default}, ckpt, max_images=16)
        assert (job.seed, job.settings) == (0, SampleSettings()), name


# (field, command-line text, JSON value): the same value in both front ends' spellings.
SAME_VALUE = [
    ("steps", "7", 7), ("steps", "0", 0), ("steps", "101", 101), ("steps", "1.5", 1.5), ("steps", "٣", "٣"),
    ("steps", "1_0", "1_0"), ("steps", "9" * 4000, int("9" * 4000)),
    ("eta", "0.5", 0.5), ("eta", "-1", -1), ("eta", "nan", math.nan), ("eta", "inf", math.inf), ("eta", "1e3", 1e3),
    ("eta", "1001", 1001), ("eta", "١", "١"),
    ("guidance", "3", 3), ("guidance", "100", 100), ("guidance", "100.5", 100.5), ("guidance", "-0.1", -0.1),
    ("threshold", "0.99", 0.99), ("threshold", "1.5", 1.5), ("threshold", "0", 0),
    ("seed", "4294967295", 4294967295), ("seed", "4294967296", 4294967296), ("seed", "-1", -1),
    ("sampler", "ddim", "ddim"), ("sampler", "euler", "euler"), ("spacing", "trailing", "trailing"),
    ("variance", "small", "small"), ("variance", "tiny", "tiny"),
    ("guidance_interval", "0.3,3", [0.3, 3]), ("guidance_interval", "0, 80.5", [0, 80.5]),
    ("guidance_interval", "3,0.3", [3, 0.3]), ("guidance_interval", "1,1", [1, 1]), ("guidance_interval", "1", [1]),
    ("guidance_interval", "-1,2", [-1, 2]), ("guidance_interval", "nan,2", [math.nan, 2]),
    ("guidance_interval", "none", None), ("guidance_interval", "1,2,3", [1, 2, 3]),
]


@pytest.mark.parametrize("name, text, value", SAME_VALUE)
def test_the_cli_and_the_server_accept_and_refuse_the_same_values(tiny_checkpoint, name, text, value, capsys):
    ckpt = load_checkpoint(tiny_checkpoint)  # T = 100
    flag = "--" + name.replace("_", "-")
    try:
        cli = getattr(sample_parser().parse_args([flag, text]), name)
        if name == "steps":
            SampleSettings(steps=cli).check(ckpt.diffusion.num_timesteps)
    except (SystemExit, FieldError):
        cli = "refused"
    capsys.readouterr()
    try:
        job = serve.parse_job(json.loads(json.dumps({name: value})), ckpt, max_images=16)
        server = job.seed if name == "seed" else getattr(job.settings, name)
    except serve.BadRequest as e:
        assert e.status == 422 and str(e).startswith(f"{name}: "), str(e)  # the error names the field
        server = "refused"
    assert cli == server


@pytest.mark.parametrize("name, value", [
    ("clip_x0", None), ("threshold", None), ("eta", None), ("seed", None), ("sampler", None),
    ("clip_x0", 1), ("clip_x0", "true"), ("eta", True), ("steps", True), ("steps", 3.0), ("seed", "5"),
    ("guidance", [1]), ("guidance", {"w": 1}), ("threshold", 10**400), ("spacing", 3),
    ("guidance_interval", [2, 1]), ("guidance_interval", "0.3,3"), ("guidance_interval", [True, 2]),
    ("guidance_interval", [0, math.inf]),
])
def test_a_field_refuses_what_is_not_one_of_its_values(name, value):
    with pytest.raises(FieldError) as e:
        FIELDS[name].check(value)
    assert e.value.field == name and "\n" not in str(e.value) and len(str(e.value)) < 200


def test_null_is_a_value_only_where_the_field_says_so():
    assert FIELDS["steps"].check(None) is None  # the sampler's default number of steps
    assert FIELDS["guidance_interval"].check(None) is None  # guidance at every step
    assert [name for name, f in FIELDS.items() if f.optional] == ["steps", "guidance_interval"]


@pytest.mark.parametrize("given", [dict(threshold=None), dict(clip_x0=None), dict(eta=math.nan), dict(steps=0),
                                   dict(guidance=-1.0), dict(sampler="euler"), dict(steps=2.5)])
def test_settings_made_in_code_are_checked_as_strictly(given):
    with pytest.raises(FieldError):
        SampleSettings(**given).check()


def test_steps_beyond_the_model_s_T_name_the_field():
    with pytest.raises(FieldError) as e:
        SampleSettings(steps=1001).check(num_timesteps=1000)
    assert e.value.field == "steps" and "T = 1000" in e.value.problem
