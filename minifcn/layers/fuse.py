"""Caffe-style Crop and the skip-fusion layers Add, Concat and Scale."""
from __future__ import annotations

from ..backend import get_array_module
from ..module import Module
from ._checks import check_grad, check_nchw, check_same_device, need_forward, pair


class Crop(Module):
    """Cut ``x`` to a reference's spatial size at a fixed offset (Caffe's Crop, axis=2).

    ``y = x[:, :, oy : oy + Hr, ox : ox + Wr]`` where (Hr, Wr) is the
    reference's size: an offset, not a centre crop. FCN aligns its upsampled
    scores with the input this way (offsets 19, 5, 9, 27, 31).

    ``forward(x, reference)``: reference is an (N, C, Hr, Wr) array or an
    (Hr, Wr) pair. ``backward(dy)`` pads dy with zeros back to x's shape.
    One route; loop twin: :func:`minifcn.reference.crop`.
    """

    def __init__(self, offset=0):
        super().__init__()
        self.offset = pair(offset, "offset", 0)
        self._cache = None

    def forward(self, x, reference):
        check_nchw(x, "Crop")
        hr, wr = (tuple(reference.shape[2:]) if hasattr(reference, "shape") else pair(reference, "reference size", 1))
        oy, ox = self.offset
        if oy + hr > x.shape[2] or ox + wr > x.shape[3]:
            raise ValueError(f"Crop: offset {self.offset} + size ({hr}, {wr}) exceeds the input's spatial size "
                             f"{tuple(x.shape[2:])}")
        self._cache = (x.shape, (*x.shape[:2], hr, wr))
        return x[:, :, oy:oy + hr, ox:ox + wr]

    def backward(self, dy):
        x_shape, y_shape = need_forward(self._cache, "Crop")
        check_grad(dy, y_shape, "Crop")
        xp = get_array_module(dy)
        dx = xp.zeros(x_shape, dtype=dy.dtype)
        oy, ox = self.offset
        dx[:, :, oy:oy + dy.shape[2], ox:ox + dy.shape[3]] = dy
        return dx

    def extra_repr(self):
        return f"offset={self.offset}"


class Add(Module):
    """Skip fusion by sum: ``y = a + b`` (same shapes); backward returns ``(dy, dy)``."""

    def forward(self, a, b):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"Add: shapes must match, got {tuple(a.shape)} and {tuple(b.shape)}")
        check_same_device(a, b, "Add", "first input", "second input")
        self._shape = a.shape
        return a + b

    def backward(self, dy):
        check_grad(dy, need_forward(getattr(self, "_shape", None), "Add"), "Add")
        return dy, dy


class Concat(Module):
    """Skip fusion by channel concatenation: inputs (N, Ci, H, W) -> (N, sum Ci, H, W).

    ``backward(dy)`` returns a tuple with one gradient per input, split along C.
    """

    def forward(self, *inputs):
        if len(inputs) < 2:
            raise ValueError(f"Concat: needs at least two inputs, got {len(inputs)}")
        ref = inputs[0].shape
        for i, t in enumerate(inputs):
            check_nchw(t, "Concat")
            check_same_device(t, inputs[0], "Concat", f"input {i}", "input 0")
            if t.shape[0] != ref[0] or t.shape[2:] != ref[2:]:
                raise ValueError(f"Concat: input {i} has shape {tuple(t.shape)}, which does not match input 0's "
                                 f"{tuple(ref)} in N, H and W")
        xp = get_array_module(*inputs)
        self._channels = [t.shape[1] for t in inputs]
        y = xp.concatenate(inputs, axis=1)
        self._shape = y.shape
        return y

    def backward(self, dy):
        check_grad(dy, need_forward(getattr(self, "_shape", None), "Concat"), "Concat")
        out, start = [], 0
        for c in self._channels:
            out.append(dy[:, start:start + c])
            start += c
        return tuple(out)


class Scale(Module):
    """Multiply by a fixed constant: ``y = factor * x``. FCN-8s at-once scales
    pool4 by 0.01 and pool3 by 0.0001 before their score layers."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x):
        self._shape = x.shape
        return x * x.dtype.type(self.factor)

    def backward(self, dy):
        check_grad(dy, need_forward(getattr(self, "_shape", None), "Scale"), "Scale")
        return dy * dy.dtype.type(self.factor)

    def extra_repr(self):
        return f"factor={self.factor}"
