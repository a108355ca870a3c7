"""Crafted request bodies for the server's parser (engine.apps.serve.parse_job and the body's nesting
check), in process: 2,000 random bodies of every JSON type in every field. Each is a Job whose settings
the engine accepts, or a 422 naming a field; never another exception."""

import json
import math
import random

import pytest

from engine.formats.checkpoint import load_checkpoint
from engine.settings import FIELDS, SampleSettings

serve = pytest.importorskip("engine.apps.serve", reason="the serve extra (pip install -e '.[serve]')")

ODD = [None, True, False, 0, 1, -1, 2**31, 2**64, 10**400, 0.5, -0.0, 1e308, math.nan, math.inf, -math.inf, "",
       "0", "1", "٣", "１", "cat", "ddim", "dpm++2m", "trailing", "small", "x" * 500, [], [1], [[0]], {}, {"a": 1}]


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind < 4:
        return rng.choice(ODD)
    if kind == 4:
        return rng.uniform(-2000, 2000)
    if kind == 5:
        return rng.randrange(-5, 1500)
    if kind == 6:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(["n", "seed", "x"]): random_value(rng, depth + 1) for _ in range(rng.randrange(3))}


def test_random_bodies_are_a_job_or_a_422_naming_the_field(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    names = [*FIELDS, "class", "classes", "n", "other"]
    rng = random.Random(0)
    answered = refused = 0
    for _ in range(2000):
        body = {name: random_value(rng) for name in rng.sample(names, rng.randrange(1, 4))}
        try:
            job = serve.parse_job(body, ckpt, max_images=64)
        except serve.BadRequest as e:
            assert e.status == 422 and "\n" not in str(e) and len(str(e)) < 400, (body, e)
            refused += 1
            continue
        assert isinstance(job.settings, SampleSettings) and job.settings.check(ckpt.diffusion.num_timesteps)
        assert 1 <= job.n <= 64 and 0 <= job.seed < 2**32 and job.classes
        answered += 1
    assert answered > 20 and refused > 500  # both outcomes were exercised (46 and 1,954 with this seed)


@pytest.mark.parametrize("seed", range(5))
def test_the_nesting_check_counts_what_json_would_recurse_into(seed):
    rng = random.Random(seed)
    for _ in range(200):
        value = random_value(rng)
        text = json.dumps(value)

        def depth(v):
            if isinstance(v, list):
                return 1 + max((depth(x) for x in v), default=0)
            if isinstance(v, dict):
                return 1 + max((depth(x) for x in v.values()), default=0)
            return 0

        assert serve.nesting(text.encode()) == depth(value), text
    assert serve.nesting(b'["[[[[", {"]": "{{"}]') == 2  # brackets inside strings do not count
