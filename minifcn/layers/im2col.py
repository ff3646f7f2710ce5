"""im2col / col2im: the shared machinery of convolution and transposed convolution.

``im2col`` unfolds every receptive field of a padded input into a column, so a
convolution becomes one matrix product. ``col2im`` is its *adjoint*, not its
inverse: it adds (``+=``) every column entry back to the input pixel it came
from, so pixels covered by several windows receive the sum of their
contributions.

Layout: columns are ``(C * kh * kw, N * OH * OW)``. Row ``c * kh * kw + i * kw + j``
matches a PyTorch weight ``(out, C, kh, kw)`` flattened to ``(out, C*kh*kw)``;
the batch is folded into the columns, so one matrix product serves the whole
batch (for N = 1 this is the same memory as ``(1, C*kh*kw, OH*OW)``).

Both loop over kernel offsets only, each step moving a whole strided slice of
every image, channel and output position. When the stride divides the kernel
(``k = m * s``, as in FCN's ``k = 2s`` upsampling) the offsets ``i = a*s + r``
are taken ``s x s`` at a time through a ``(H/s, s)`` view of the input:
``m * m`` steps instead of ``k * k`` (4 instead of 4096 for k = 64, s = 32).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module

_workspaces = {}


def workspace(xp, dtype, shape):
    """A reusable scratch array of ``shape`` (valid until the next call with the same xp and dtype).

    Columns live here only between an ``im2col`` and the matrix product that
    consumes them, so the largest layer's columns are allocated once per run
    instead of once per layer and step.
    """
    size = int(np.prod(shape))
    key = (xp.__name__, np.dtype(dtype).str)
    buf = _workspaces.get(key)
    if buf is None or buf.size < size:
        buf = _workspaces[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def release_workspaces() -> None:
    """Free the scratch buffers (they are re-created on demand)."""
    _workspaces.clear()


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution: ``floor((size + 2p - d(k-1) - 1) / s) + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    """Output length of a transposed convolution: ``(size-1)s - 2p + d(k-1) + output_padding + 1``."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _window(i, j, stride, dilation, out_hw):
    """The strided slice of the padded input that kernel offset (i, j) reads, for every output."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    return (slice(None), slice(None),
            slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
            slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


def _blocked(kernel, stride, dilation):
    """True when offsets can be taken s x s at a time: dilation 1 and s > 1 dividing k."""
    return (dilation == (1, 1) and stride[0] > 1 and stride[1] > 1
            and kernel[0] % stride[0] == 0 and kernel[1] % stride[1] == 0)


def _blocked_col2im(kernel, stride, dilation):
    """col2im takes blocks only for large kernels: below about 512 offsets the
    plain per-offset loop moves longer contiguous runs and wins (measured)."""
    return _blocked(kernel, stride, dilation) and kernel[0] * kernel[1] >= 512


def _is_pointwise(kernel, stride, padding, shape_hw, out_hw):
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0) and tuple(out_hw) == tuple(shape_hw)


def _round_up(size, multiple):
    return -(-size // multiple) * multiple


def _block_view(xpad, stride):
    """(N, C, Hs, Ws) with Hs, Ws multiples of the stride -> (N, C, Hs/s, s, Ws/s, s), a view."""
    n, c, hs, ws = xpad.shape
    (sh, sw) = stride
    return xpad.reshape(n, c, hs // sh, sh, ws // sw, sw)  # contiguous input: always a view


def im2col(x, kernel, stride, padding, dilation, out_hw=None, out=None):
    """Unfold receptive fields into columns.

    Inputs:
        x: (N, C, H, W).
        kernel, stride, padding, dilation: (h, w) pairs.
        out_hw: optional (OH, OW) no larger than the natural output size; only
            those output positions are unfolded (used by transposed convolution
            when ``output_padding`` adds rows no input pixel reaches).
        out: optional array of shape (C*kh*kw, N*OH*OW) to write into (for
            example a :func:`workspace`).
    Returns:
        cols: (C * kh * kw, N * OH * OW), and (OH, OW).
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = kernel, padding
    natural = (conv_output_size(h, kh, stride[0], ph, dilation[0]),
               conv_output_size(w, kw, stride[1], pw, dilation[1]))
    oh, ow = natural if out_hw is None else tuple(out_hw)
    if _is_pointwise(kernel, stride, padding, (h, w), (oh, ow)):
        cols = x.reshape(n, c, h * w).transpose(1, 0, 2)  # a 1x1 convolution needs no unfolding
        if n == 1:
            return cols.reshape(c, h * w), (oh, ow)  # a view of x: nothing to copy
        target = out if out is not None else xp.empty((c, n * h * w), dtype=x.dtype)
        target.reshape(c, n, h * w)[...] = cols
        return target, (oh, ow)
    blocked = _blocked(kernel, stride, dilation)
    hp, wp = h + 2 * ph, w + 2 * pw
    if blocked:  # the block view needs sides that are multiples of the stride
        hp, wp = _round_up(hp, stride[0]), _round_up(wp, stride[1])
    if (hp, wp) != (h, w) or (blocked and not x.flags.c_contiguous):
        xpad = xp.zeros((n, c, hp, wp), dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xpad = x
    cols = out if out is not None else xp.empty((c * kh * kw, n * oh * ow), dtype=x.dtype)
    if blocked:
        (sh, sw), (mh, mw) = stride, (kh // stride[0], kw // stride[1])
        # input row (oh + a) * s + r is read by kernel row a * s + r of output row oh
        blocks = _block_view(xpad, stride)
        cols8 = cols.reshape(c, mh, sh, mw, sw, n, oh, ow)
        for a in range(mh):
            for b in range(mw):
                cols8[:, a, :, b] = blocks[:, :, a:a + oh, :, b:b + ow].transpose(1, 3, 5, 0, 2, 4)
        return cols, (oh, ow)
    cols6 = cols.reshape(c, kh, kw, n, oh, ow)
    for i in range(kh):
        for j in range(kw):
            cols6[:, i, j] = xpad[_window(i, j, stride, dilation, (oh, ow))].transpose(1, 0, 2, 3)
    return cols, (oh, ow)


def col2im(cols, x_shape, kernel, stride, padding, dilation, out_hw):
    """Adjoint of :func:`im2col`: scatter-*add* columns back onto the input grid.

    Inputs:
        cols: (C * kh * kw, N * OH * OW).
        x_shape: (N, C, H, W), the shape of the image im2col unfolded.
        out_hw: (OH, OW).
    Returns:
        (N, C, H, W) with ``out[n, c, y, x] = sum of every column entry that
        im2col copied from (y, x)``; entries that came from padding are dropped.
    """
    xp = get_array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (ph, pw) = kernel, padding
    oh, ow = out_hw
    if _is_pointwise(kernel, stride, padding, (h, w), (oh, ow)):
        # Always a copy, never a view: cols is often the shared workspace, which the
        # next convolution overwrites (a view here corrupted 1x1 convolutions' input
        # gradients at batch size 1, e.g. FCN's score_pool4 -> pool4 skip).
        return cols.reshape(c, n, h, w).transpose(1, 0, 2, 3).copy()
    blocked = _blocked_col2im(kernel, stride, dilation)
    hp, wp = h + 2 * ph, w + 2 * pw
    if blocked:
        hp, wp = _round_up(hp, stride[0]), _round_up(wp, stride[1])
    xpad = xp.zeros((n, c, hp, wp), dtype=cols.dtype)
    if blocked:
        (sh, sw), (mh, mw) = stride, (kh // stride[0], kw // stride[1])
        blocks = _block_view(xpad, stride)
        cols8 = cols.reshape(c, mh, sh, mw, sw, n, oh, ow)
        for a in range(mh):
            for b in range(mw):
                # += not =: neighbouring blocks overlap when the kernel is larger than the stride
                blocks[:, :, a:a + oh, :, b:b + ow] += cols8[:, a, :, b].transpose(3, 0, 4, 1, 5, 2)
    else:
        cols6 = cols.reshape(c, kh, kw, n, oh, ow)
        for i in range(kh):
            for j in range(kw):
                # += not =: windows overlap, and each pixel collects all its uses.
                xpad[_window(i, j, stride, dilation, (oh, ow))] += cols6[:, i, j].transpose(1, 0, 2, 3)
    return xpad[:, :, ph:ph + h, pw:pw + w]
