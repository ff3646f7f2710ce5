"""Upsampling by nearest-neighbour and bilinear interpolation.

Both are linear and separable: along each axis the output is a fixed matrix
``A`` (out_len, in_len) times the input, so ``y = A_h x A_w^T`` per image and
channel, and the backward pass is ``dx = A_h^T dy A_w``.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..backend import get_array_module
from ..module import Module
from ._checks import check_grad, check_nchw, need_forward

_MODES = ("nearest", "bilinear")


def interpolation_matrix(in_len: int, out_len: int, mode: str, scale: float | None = None) -> np.ndarray:
    """The (out_len, in_len) float64 matrix of 1-D nearest or linear interpolation.

    ``scale`` is the source step per output pixel (PyTorch: ``1 / scale_factor``
    when a scale factor was given, else ``in_len / out_len``).

    * nearest: output ``o`` copies input ``min(floor(o * scale), in_len - 1)``.
    * bilinear (``align_corners=False``, half-pixel centres): output ``o`` sits at
      ``src = max((o + 0.5) * scale - 0.5, 0)`` and mixes inputs ``floor(src)``
      and the next one (clamped) with weights ``1 - frac`` and ``frac``.
    """
    if scale is None:
        scale = in_len / out_len
    out = np.arange(out_len, dtype=np.float64)
    a = np.zeros((out_len, in_len), dtype=np.float64)
    rows = np.arange(out_len)
    if mode == "nearest":
        src = np.minimum(np.floor(out * scale).astype(np.int64), in_len - 1)
        a[rows, src] = 1.0
    elif mode == "bilinear":
        src = np.maximum((out + 0.5) * scale - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), in_len - 1)
        i1 = np.minimum(i0 + 1, in_len - 1)
        frac = src - i0
        np.add.at(a, (rows, i0), 1.0 - frac)
        np.add.at(a, (rows, i1), frac)
    else:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    return a


class Upsample(Module):
    """Resize (N, C, H, W) images by nearest or bilinear interpolation.

    Args: exactly one of ``scale_factor`` (number or (h, w) pair, output side
    ``floor(H * scale)``) or ``size`` ((OH, OW) or int); ``mode`` 'nearest' or
    'bilinear'. Bilinear uses half-pixel centres, PyTorch's
    ``align_corners=False``; nearest matches PyTorch's 'nearest'.

    Shapes: (N, C, H, W) -> (N, C, OH, OW). One route (two products); loop twins:
    :func:`minifcn.reference.upsample_nearest`, :func:`minifcn.reference.upsample_bilinear`.
    """

    def __init__(self, scale_factor=None, mode: str = "nearest", size=None):
        super().__init__()
        if mode not in _MODES:
            raise ValueError(f"Upsample: mode must be one of {_MODES}, got {mode!r}")
        if (scale_factor is None) == (size is None):
            raise ValueError("Upsample: give exactly one of scale_factor and size")
        self.mode = mode
        self.scale_factor = self._pair_of(scale_factor, "scale_factor", float) if scale_factor is not None else None
        self.size = self._pair_of(size, "size", int) if size is not None else None
        self._matrices = {}
        self._cache = None

    @staticmethod
    def _pair_of(value, name, kind):
        values = (value, value) if isinstance(value, numbers.Number) else tuple(value)
        if len(values) != 2 or not all(isinstance(v, numbers.Number) and v > 0 for v in values):
            raise ValueError(f"Upsample: {name} must be a positive number or pair, got {value!r}")
        if kind is int and not all(float(v).is_integer() for v in values):
            raise ValueError(f"Upsample: size must be integers, got {value!r}")
        return tuple(kind(v) for v in values)

    def output_hw(self, h, w):
        if self.size is not None:
            return self.size
        return (int(math.floor(h * self.scale_factor[0])), int(math.floor(w * self.scale_factor[1])))

    def _matrix(self, xp, dtype, in_len, out_len, axis):
        key = (xp.__name__, np.dtype(dtype).str, in_len, out_len, axis)
        if key not in self._matrices:
            scale = None if self.scale_factor is None else 1.0 / self.scale_factor[axis]
            self._matrices[key] = xp.asarray(interpolation_matrix(in_len, out_len, self.mode, scale).astype(dtype))
        return self._matrices[key]

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW)."""
        check_nchw(x, "Upsample")
        xp = get_array_module(x)
        h, w = x.shape[2:]
        oh, ow = self.output_hw(h, w)
        if oh < 1 or ow < 1:
            raise ValueError(f"Upsample: output size ({oh}, {ow}) for input {tuple(x.shape)} is empty")
        a_h = self._matrix(xp, x.dtype, h, oh, 0)
        a_w = self._matrix(xp, x.dtype, w, ow, 1)
        y = a_h @ (x @ a_w.T)  # (OH, H) @ (N, C, H, OW) -> (N, C, OH, OW)
        self._cache = (a_h, a_w, y.shape)
        return y

    def backward(self, dy):
        """dy: (N, C, OH, OW) -> dx: (N, C, H, W) = A_h^T dy A_w."""
        a_h, a_w, y_shape = need_forward(self._cache, "Upsample")
        check_grad(dy, y_shape, "Upsample")
        return (a_h.T @ dy) @ a_w

    def extra_repr(self):
        what = f"size={self.size}" if self.size is not None else f"scale_factor={self.scale_factor}"
        return f"{what}, mode={self.mode!r}"
