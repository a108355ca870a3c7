import math

import pytest
import torch

from engine.noise import INITIAL_STREAM, gaussian_noise, hash32, image_keys


def lowbias32_reference(x: int) -> int:
    """Wellons' lowbias32, written with Python's unbounded ints."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash_matches_the_reference_on_the_whole_32_bit_range():
    values = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + torch.randint(0, 2**32, (1000,)).tolist()
    got = hash32(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [lowbias32_reference(v) for v in values]


def test_noise_is_standard_normal():
    z = gaussian_noise(image_keys(0, torch.arange(64)), 5, (3, 16, 16)).double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert z.var().item() == pytest.approx(1.0, abs=4 * math.sqrt(2 / n))
    assert (z**4).mean().item() == pytest.approx(3.0, abs=0.1)
    # Neighbouring elements and different images are uncorrelated.
    flat = z.flatten(1)
    assert abs((flat[:, 1:] * flat[:, :-1]).mean().item()) < 4 / math.sqrt(n)
    assert abs((flat[1:] * flat[:-1]).mean().item()) < 4 / math.sqrt(n)


def test_streams_and_seeds_are_independent():
    keys = image_keys(0, torch.arange(16))
    a = gaussian_noise(keys, 0, (3, 8, 8)).flatten()
    for other in (gaussian_noise(keys, 1, (3, 8, 8)), gaussian_noise(keys, INITIAL_STREAM, (3, 8, 8)),
                  gaussian_noise(image_keys(1, torch.arange(16)), 0, (3, 8, 8))):
        corr = torch.corrcoef(torch.stack([a, other.flatten()]))[0, 1].item()
        assert abs(corr) < 4 / math.sqrt(len(a))


def test_image_noise_does_not_depend_on_the_batch():
    full = gaussian_noise(image_keys(7, torch.arange(10)), 3, (3, 4, 4))
    part = gaussian_noise(image_keys(7, torch.tensor([8, 2])), 3, (3, 4, 4))
    assert torch.equal(part, full[[8, 2]])


def test_stream_may_be_a_device_tensor():
    keys = image_keys(3, torch.arange(4))
    assert torch.equal(gaussian_noise(keys, torch.tensor(11), (2, 2)), gaussian_noise(keys, 11, (2, 2)))


def test_seed_out_of_range_is_rejected():
    with pytest.raises(ValueError):
        image_keys(2**32, torch.arange(2))
