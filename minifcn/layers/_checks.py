"""Argument normalisation and input validation shared by the layers."""
from __future__ import annotations

import numbers
import random

import numpy as np

from ..backend import device_of, get_array_module

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
    if not hasattr(dy, "shape") or not hasattr(dy, "dtype"):
        raise TypeError(f"{layer}: upstream gradient must be a NumPy or CuPy array, got {type(dy).__name__}")
    if tuple(dy.shape) != tuple(expected_shape):
        raise ValueError(f"{layer}: upstream gradient has shape {tuple(dy.shape)}, forward produced {tuple(expected_shape)}")
    if dy.dtype.kind != "f":
        raise ValueError(f"{layer}: upstream gradient must be float32 or float64, got dtype {dy.dtype} "
                         f"(convert it with .astype(np.float32))")
    return dy


def need_forward(cache, layer: str):
    if cache is None:
        raise RuntimeError(f"{layer}: backward called before forward")
    return cache


def check_accumulate(accumulate, shape, xp, dtype, where: str):
    """The array a gradient is added into: a new zero array when None, else ``accumulate``
    itself after checking that it is contiguous and of ``shape`` (a parameter's ``.grad``)."""
    if accumulate is None:
        return xp.zeros(shape, dtype=dtype)
    if tuple(accumulate.shape) != tuple(shape) or not accumulate.flags.c_contiguous:
        raise ValueError(f"{where}: accumulate must be a contiguous array of shape "
                         f"{tuple(shape)}, got shape {tuple(accumulate.shape)} "
                         f"(C-contiguous: {bool(accumulate.flags.c_contiguous)})")
    return accumulate


def add_or_store(accumulate, value, overwrite: bool):
    """``accumulate += value``, or ``accumulate[...] = value`` where ``overwrite``: the first pass after a lazy
    ``zero_grad`` (:meth:`minifcn.module.Parameter.grad_for_backward`), whose stale numbers are not to be kept."""
    if overwrite:
        accumulate[...] = value
    else:
        accumulate += value
    return accumulate


def check_same_dtype(x, weight, layer: str):
    """An input on another device than the weight, or whose dtype is not the weight's (NumPy
    would promote, silently and slowly)."""
    check_same_device(x, weight, layer)
    if x.dtype != weight.dtype:
        raise ValueError(f"{layer}: input dtype {x.dtype} does not match weight dtype {weight.dtype}; cast one "
                         f"of them (layer.astype({x.dtype.name!r}) or x.astype({weight.dtype.name!r}))")


def check_kernel_fits(x_shape, kernel, padding, dilation, layer: str):
    """A kernel extent ``d(k-1) + 1`` larger than the padded input."""
    for a in (0, 1):
        span = dilation[a] * (kernel[a] - 1) + 1
        if x_shape[2 + a] + 2 * padding[a] < span:
            raise ValueError(f"{layer}: kernel extent {span} (kernel_size={tuple(kernel)}, dilation="
                             f"{tuple(dilation)}) is larger than the padded input {'HW'[a]}={x_shape[2 + a]}+2*"
                             f"{padding[a]} (input shape {tuple(x_shape)})")


def check_positive_output(out_shape, x_shape, padding, layer: str):
    """An output size that padding has made zero or negative."""
    if min(out_shape[2:]) < 1:
        raise ValueError(f"{layer}: output size {tuple(out_shape[2:])} is not positive for input shape "
                         f"{tuple(x_shape)} (padding={padding} removes too much)")

class SavedInput:
    """The input a layer keeps for its backward, and a check that it was not changed in place.

    A layer that needs its input in backward (a convolution's weight gradient
    is ``dy . im2col(x)^T``) keeps a reference, not a copy. Changing that array
    in place between forward and backward (``y = conv(x); x[:] = 0``) would
    make backward compute the gradient of another input, silently. PyTorch
    raises there (a version counter on every tensor); NumPy arrays have none.
    So forward keeps the bytes of ``SAMPLES`` elements of the input, evenly
    spaced in memory order from a random start (256 to 511 numbers, whatever
    the input's size), and backward compares them: a change raises RuntimeError.

    What it catches: any in-place change to a run of at least ``size / 256``
    consecutive elements (in C order) that changes their values: refilling a
    buffer with the next batch, ``x[:] = 0``, ``x -= mean``, one image of a
    batch, one channel, a few rows. A change to a few scattered elements may
    pass unseen (the gradient is then off by about that change).

    Why not the alternatives: a copy or a checksum of the whole input reads
    every element once more, forward and backward (for FCN-8s, 50 times the
    sample's cost: benchmarks/RESULTS.md); making the caller's array
    read-only (``x.flags.writeable = False`` until backward) costs nothing but
    also forbids the ordinary finite-difference loop (``x[i] += eps; f(x)``,
    forward without backward), exists only in NumPy, and misses writes
    through another view of the same memory.
    """

    SAMPLES = 256
    _starts = random.Random(0)  # its own generator: the user's random module is left alone
    __slots__ = ("array", "_where", "_sample")

    def __init__(self, x):
        self.array = x
        step = max(1, x.size // self.SAMPLES)
        self._where = slice(self._starts.randrange(step), x.size, step)
        self._sample = self._take()

    def _take(self) -> bytes:
        x = self.array
        if x.flags.c_contiguous:
            sample = x.reshape(-1)[self._where]
        else:  # any other layout: gather the same positions
            flat = np.arange(x.size)[self._where]
            sample = x[tuple(get_array_module(x).asarray(i) for i in np.unravel_index(flat, x.shape))]
        return sample.tobytes()  # compared bit for bit: a NaN left alone is unchanged, a rewritten one too

    def check(self, layer: str):
        """The saved input, after checking its sample; RuntimeError naming ``layer`` if it changed."""
        if self._take() != self._sample:
            raise RuntimeError(
                f"{layer}: its input (shape {tuple(self.array.shape)}) was changed in place between forward "
                f"and backward, so backward would compute the gradient of another input. Change the array "
                f"only after backward, or pass forward a copy (x.copy()).")
        return self.array
