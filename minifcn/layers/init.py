"""Weight initialisers: FCN's bilinear upsampling kernel and He initialisation."""
from __future__ import annotations

import math

import numpy as np

from ._checks import pair


def upsample_filt(kernel_size) -> np.ndarray:
    """The 2-D bilinear kernel of FCN's ``surgery.upsample_filt`` (float64, (kh, kw)).

    Per axis: ``f = ceil(k / 2)``, centre ``c = f - 1`` if k is odd else
    ``f - 0.5``, weight ``1 - |i - c| / f``. For k = 4: [0.25, 0.75, 0.75, 0.25]
    per axis, so [0.0625, 0.1875, 0.1875, 0.0625] along the first row.
    """
    axes = []
    for k in pair(kernel_size, "kernel_size", 1):
        f = math.ceil(k / 2)
        c = f - 1 if k % 2 == 1 else f - 0.5
        axes.append(1.0 - np.abs(np.arange(k) - c) / f)
    return np.outer(axes[0], axes[1])


def bilinear_kernel(in_channels: int, out_channels: int, kernel_size, dtype=np.float32) -> np.ndarray:
    """A ConvTranspose2d weight (in, out, kh, kw) that upsamples each channel bilinearly.

    The kernel sits on the channel diagonal (``W[c, c] = upsample_filt``, zero
    elsewhere), so channel c of the output depends only on channel c of the
    input. With stride s and kernel 2s (padding s/2 for even s) this equals
    bilinear interpolation by s away from the borders.
    """
    weight = np.zeros((in_channels, out_channels, *pair(kernel_size, "kernel_size", 1)), dtype=np.float64)
    filt = upsample_filt(kernel_size)
    for c in range(min(in_channels, out_channels)):
        weight[c, c] = filt
    return weight.astype(dtype)


def he_normal(shape, fan_in: int, rng=None, dtype=np.float32) -> np.ndarray:
    """He (Kaiming) normal initialisation: N(0, 2 / fan_in), for layers followed by ReLU."""
    rng = np.random.default_rng(rng)
    std = math.sqrt(2.0 / fan_in)  # a Python float: keeps float32 arrays float32
    return (rng.standard_normal(shape, dtype=np.float32 if dtype == np.float32 else np.float64) * std).astype(dtype)


def uniform_init(shape, fan_in: int, dtype, rng) -> np.ndarray:
    """PyTorch's default for convolution weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)
