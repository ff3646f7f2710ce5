"""Argument normalisation and input validation shared by the layers."""
from __future__ import annotations

import numbers

from ..backend import device_of

_DEVICE_WORDS = {"cpu": "the CPU (a NumPy array)", "gpu": "the GPU (a CuPy array)"}


def pair(value, name: str, minimum: int = 0):
    """Return ``(h, w)`` from an int or a pair of ints, each ``>= minimum``."""
    if isinstance(value, numbers.Integral):
        out = (int(value), int(value))
    else:
        try:
            out = tuple(value)
        except TypeError:
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}") from None
        if len(out) != 2 or not all(isinstance(v, numbers.Integral) for v in out):
            raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
        out = (int(out[0]), int(out[1]))
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_nchw(x, layer: str, channels: int | None = None):
    """Validate a batched image tensor ``(N, C, H, W)`` of floating dtype."""
    if not hasattr(x, "ndim") or not hasattr(x, "dtype"):
        raise TypeError(f"{layer}: expected a NumPy or CuPy array, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{layer}: expected input of shape (N, C, H, W), got ndim={x.ndim} shape={tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise ValueError(f"{layer}: expected a float32 or float64 input, got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{layer}: expected {channels} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    return x


def check_same_device(x, other, layer: str, what: str = "input", other_what: str = "weights"):
    """``x`` and ``other`` on one device, else an error naming both (instead of CuPy's
    TypeError on an implicit conversion, or a silent copy)."""
    here, there = device_of(x), device_of(other)
    if here != there:
        raise ValueError(
            f"{layer}: {what} on {_DEVICE_WORDS[here]}, {other_what} on {_DEVICE_WORDS[there]}; move one of "
            f"them to the other's device: minifcn.backend.to_device(array, {there!r}), or model.to({here!r})")
    return x


def check_grad(dy, expected_shape, layer: str):
    """Validate an upstream gradient against the shape forward produced."""
    if dy is None:
        raise ValueError(f"{layer}: backward needs an upstream gradient, got None")
    if tuple(dy.shape) != tuple(expected_shape):
        raise ValueError(f"{layer}: upstream gradient has shape {tuple(dy.shape)}, forward produced {tuple(expected_shape)}")
    return dy


def need_forward(cache, layer: str):
    if cache is None:
        raise RuntimeError(f"{layer}: backward called before forward")
    return cache
