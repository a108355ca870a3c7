"""Per-image Gaussian noise that does not depend on the batch, the device or the backend.

Each image has its own key, derived from the run's seed and the image's index, and every
noise draw is a pure function of (key, stream, element): a counter-based generator made of
32-bit integer hashing (Wellons' "lowbias32") and the Box-Muller transform, written in
plain tensor ops. So image i of a run is the same whatever the batch size, the number of
processes or the device, and the draw needs no host synchronisation, so it can be
captured in a CUDA graph with the stream index held in a device tensor.

All integer arithmetic is done on int64 tensors holding values in [0, 2^32), with every
product split so that it stays below 2^63 (no signed overflow on any device).
"""

from __future__ import annotations

import math

import torch

from engine.errors import ConfigError

MASK32 = 0xFFFFFFFF
INITIAL_STREAM = MASK32  # the stream of x_T; sampling step i draws from stream i


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) and a constant c < 2^32."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a 32-bit integer hash with good avalanche (bias ~0.17)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_keys(seed: int, indices: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per image: hash(hash(seed) ^ index)."""
    if not 0 <= seed <= MASK32:
        raise ConfigError(f"seed must be in [0, {MASK32}]")
    seed_key = hash32(torch.tensor(seed, dtype=torch.int64))
    return hash32(seed_key.to(indices.device) ^ (indices.to(torch.int64) & MASK32))


def gaussian_noise(keys: torch.Tensor, stream: int | torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise of shape (len(keys), *shape), float32 maths, cast to dtype.

    `stream` (an int or a 0-d int64 tensor on the keys' device) selects an independent
    stream for the same images: the initial noise and each sampling step use their own.
    """
    stream = torch.as_tensor(stream, dtype=torch.int64, device=keys.device) & MASK32
    stream_keys = hash32(keys.to(torch.int64) ^ hash32(stream))  # (B,)
    numel = math.prod(shape)
    counters = torch.arange(2 * numel, device=keys.device, dtype=torch.int64)
    bits = hash32(stream_keys[:, None] ^ hash32(counters)[None, :])  # (B, 2 * numel)
    # 24 random bits -> uniforms in (0, 1]; log never sees 0.
    uniforms = ((bits >> 8) + 1).to(torch.float32) * (1.0 / (1 << 24))
    u1, u2 = uniforms[:, 0::2], uniforms[:, 1::2]
    # Box-Muller: sqrt(-2 ln u1) cos(2 pi u2) ~ N(0, 1).
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return z.reshape(len(keys), *shape).to(dtype)
