"""Helpers the engine's tests share."""

import numpy as np


def same_images(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float rounding: the noise is bit-identical, but the CPU convolution may pick
    another algorithm for another batch size, and a last-bit difference can flip a rounding
    to uint8 by one level."""
    diff = np.abs(a.astype(int) - b)
    return diff.max() <= 1 and (diff > 0).mean() < 1e-3
