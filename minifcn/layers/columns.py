"""im2col / col2im: the columns that convolution and transposed convolution share.

``im2col`` unfolds every receptive field of a padded input into a column, so a
convolution becomes a matrix product. ``col2im`` is its *adjoint*, not its
inverse: it adds (``+=``) every column entry back to the input pixel it came
from, so pixels covered by several windows receive the sum of their
contributions. The textbook routes of :mod:`minifcn.layers.conv` call
:func:`im2col` and :func:`col2im` on the whole input.

Layout: columns are ``(N, C * kh * kw, OH * OW)``, the layout of PyTorch's
``F.unfold``. Row ``c * kh * kw + i * kw + j`` matches a PyTorch weight
``(out, C, kh, kw)`` flattened to ``(out, C*kh*kw)``, and a column's position
``p * OW + q`` is the output pixel's, so ``W @ cols`` is the convolution's
output ``(N, out, OH*OW)`` in NCHW order with nothing to transpose.

**Bands** (used by the fast routes, :mod:`minifcn.layers.conv_fast`). Output
rows ``r0 .. r1`` of every image depend only on their own columns, so a
convolution may unfold one *band* of output rows at a time into a scratch
buffer small enough to stay in cache (:meth:`Unfolding.bands`), multiply, and
move on. Rule (figures in ``benchmarks/RESULTS.md``): products with at most
``BAND_CHANNELS`` output channels are memory-bound and get bands of about
``BAND_BYTES``; larger ones are compute-bound and get one band.

Both :meth:`Unfolding.unfold` and :meth:`Unfolding.fold` loop over kernel
offsets only, each step moving a whole strided slice of every image and
channel. ``unfold`` takes the offsets ``s x s`` at a time when the stride
divides the kernel (``k = m * s``, as in FCN's ``k = 2s`` upsampling), through
a ``(H/s, s)`` view of the input: ``m * m`` steps instead of ``k * k``;
``fold`` always takes them one at a time.

Scratch buffers (:func:`workspace`) belong to the thread that asks for them,
so two user threads, or two band workers, never share one.
"""
from __future__ import annotations

import threading
import weakref

import numpy as np

from ..backend import get_array_module

# Bytes of unfolded columns per band, by array module (0: no bands). On the
# CPU a band should stay in cache; a GPU wants one large product instead.
BAND_BYTES = {"numpy": 4 << 20, "cupy": 0}
BAND_CHANNELS = 64         # products with more output channels are compute-bound: one band
MIN_COPY_BYTES = 64 << 10  # a band moves at least this much per kernel offset

class _Buffers:
    """One thread's scratch arrays, ``arrays[(module, dtype, name)]`` (an object a WeakSet can hold)."""

    __slots__ = ("arrays", "__weakref__")

    def __init__(self):
        self.arrays = {}


_local = threading.local()        # .buffers: this thread's _Buffers
_every_thread = weakref.WeakSet()  # all live threads' _Buffers, for release_workspaces
_lock = threading.Lock()


def workspace(xp, dtype, shape, name="columns"):
    """A reusable scratch array of ``shape``, this thread's own (valid until
    this thread's next call with the same xp, dtype and name).

    Columns live here only between an unfolding and the matrix product that
    consumes them, so they are allocated once per thread instead of once per
    layer, band and step (fresh large arrays are slow: every page is faulted
    in again). Per thread, because band loops may run from several user
    threads at once, and each band worker is a thread of its own.
    """
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = _Buffers()
        with _lock:
            _every_thread.add(buffers)
    size = int(np.prod(shape))
    key = (xp.__name__, np.dtype(dtype).str, name)
    buf = buffers.arrays.get(key)
    if buf is None or buf.size < size:
        buf = buffers.arrays[key] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def release_workspaces() -> None:
    """Free every thread's scratch buffers (they are re-created on demand), for
    example between unrelated jobs in one process; not while a convolution runs."""
    with _lock:
        for buffers in _every_thread:
            buffers.arrays.clear()


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution: ``floor((size + 2p - d(k-1) - 1) / s) + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    """Output length of a transposed convolution: ``(size-1)s - 2p + d(k-1) + output_padding + 1``."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _round_up(size, multiple):
    return -(-size // multiple) * multiple


class Unfolding:
    """The geometry of one im2col, and im2col / col2im over bands of output rows.

    Args:
        x_shape: (N, C, H, W) of the image being unfolded.
        kernel, stride, padding, dilation: (h, w) pairs.
        out_hw: optional (OH, OW) no larger than the natural output size; only
            those output positions are unfolded (transposed convolution uses it
            when ``output_padding`` adds rows no input pixel reaches).

    Usage: ``xpad = u.pad(x)``, then for each ``(r0, r1)`` in ``u.bands(...)``,
    ``cols = u.unfold(xpad, r0, r1, out)``; in the other direction
    ``gpad = u.zeros(xp, dtype)``, ``u.fold(cols, gpad, r0, r1)`` per band,
    and ``u.crop(gpad)``.
    """

    def __init__(self, x_shape, kernel, stride, padding, dilation, out_hw=None):
        self.x_shape = tuple(int(s) for s in x_shape)
        n, c, h, w = self.x_shape
        self.kernel, self.stride, self.padding, self.dilation = (
            tuple(kernel), tuple(stride), tuple(padding), tuple(dilation))
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.padding, self.dilation
        natural = (conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))
        self.out_hw = natural if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
        self.rows = c * kh * kw                   # rows of the columns: C * kh * kw
        self.pointwise = (self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
                          and self.out_hw == (h, w))
        # Offsets s x s at a time: dilation 1 and a stride s > 1 dividing the kernel.
        self.blocked = (self.dilation == (1, 1) and sh > 1 and sw > 1 and kh % sh == 0 and kw % sw == 0)

    # -- padded grids ---------------------------------------------------------------

    def _padded_hw(self, blocked):
        _, _, h, w = self.x_shape
        hp, wp = h + 2 * self.padding[0], w + 2 * self.padding[1]
        if blocked:  # the block view needs sides that are multiples of the stride
            hp, wp = _round_up(hp, self.stride[0]), _round_up(wp, self.stride[1])
        return hp, wp

    def pad(self, x):
        """x zero-padded for :meth:`unfold` (x itself when nothing needs padding)."""
        hp, wp = self._padded_hw(self.blocked)
        n, c, h, w = self.x_shape
        if (hp, wp) == (h, w) and x.flags.c_contiguous:
            return x
        xpad = get_array_module(x).zeros((n, c, hp, wp), dtype=x.dtype)
        ph, pw = self.padding
        xpad[:, :, ph:ph + h, pw:pw + w] = x
        return xpad

    def zeros(self, xp, dtype, blocked=False):
        """A zero padded grid for :meth:`fold` to add into (sides rounded up to
        multiples of the stride when ``blocked``, for an s x s block view)."""
        n, c = self.x_shape[:2]
        return xp.zeros((n, c) + self._padded_hw(blocked), dtype=dtype)

    def crop(self, gpad):
        """The image part of a padded grid: (N, C, H, W), a view."""
        _, _, h, w = self.x_shape
        ph, pw = self.padding
        return gpad[:, :, ph:ph + h, pw:pw + w]

    # -- bands ----------------------------------------------------------------------

    def bands(self, xp, itemsize, channels):
        """Yield ``(r0, r1)`` bands of output rows whose columns fit the band budget.

        ``channels`` is the small side of the product that consumes the columns
        (the convolution's output channels). Only products with few of them
        (at most ``BAND_CHANNELS``) are memory-bound and gain from bands;
        others get the whole image as one band, since BLAS runs best on one
        large product. Each band moves at least ``MIN_COPY_BYTES`` per kernel
        offset so that Python's per-call cost stays small.
        """
        oh, ow = self.out_hw
        row_bytes = self.x_shape[0] * self.rows * ow * itemsize
        budget = BAND_BYTES.get(xp.__name__, 0)
        if self.pointwise or channels > BAND_CHANNELS or budget <= 0:
            step = max(1, oh)
        else:
            copies = (self.kernel[0] // self.stride[0]) * (self.kernel[1] // self.stride[1]) if self.blocked \
                else self.kernel[0] * self.kernel[1]
            budget = max(budget, copies * MIN_COPY_BYTES)
            step = max(1, budget // max(row_bytes, 1))
        for r0 in range(0, oh, step):
            yield r0, min(oh, r0 + step)

    def band_shape(self, r0, r1):
        """Shape of one band's columns: (N, C*kh*kw, (r1 - r0) * OW)."""
        return (self.x_shape[0], self.rows, (r1 - r0) * self.out_hw[1])

    # -- im2col and col2im on one band -----------------------------------------------

    def _window(self, i, j, r0, r1):
        """The strided slice of the padded grid that kernel offset (i, j) reads for output rows r0..r1."""
        (sh, sw), (dh, dw), ow = self.stride, self.dilation, self.out_hw[1]
        return (slice(None), slice(None),
                slice(r0 * sh + i * dh, (r1 - 1) * sh + i * dh + 1, sh),
                slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))

    def blocks(self, grid):
        """(N, C, Hs, Ws) with sides multiples of the stride -> (N, C, Hs/s, s, Ws/s, s), a view."""
        n, c, hs, ws = grid.shape
        (sh, sw) = self.stride
        return grid.reshape(n, c, hs // sh, sh, ws // sw, sw)

    def unfold(self, xpad, r0, r1, out=None):
        """im2col of output rows r0..r1: columns (N, C*kh*kw, (r1-r0)*OW), written into ``out``.

        ``cols[n, c*kh*kw + i*kw + j, (p - r0)*OW + q] = xpad[n, c, p*sh + i*dh, q*sw + j*dw]``.
        A 1x1 convolution needs no unfolding: its columns are a view of the input.
        """
        n, c = self.x_shape[:2]
        (kh, kw), ow, b = self.kernel, self.out_hw[1], r1 - r0
        if self.pointwise:
            return xpad.reshape(n, c, -1)[:, :, r0 * ow:r1 * ow]
        cols = out if out is not None else get_array_module(xpad).empty(self.band_shape(r0, r1), dtype=xpad.dtype)
        if self.blocked:
            (sh, sw), (mh, mw) = self.stride, (kh // self.stride[0], kw // self.stride[1])
            # padded row (p + a) * s + r is read by kernel row a * s + r of output row p
            blocks = self.blocks(xpad)
            cols8 = cols.reshape(n, c, mh, sh, mw, sw, b, ow)
            for a in range(mh):
                for e in range(mw):
                    cols8[:, :, a, :, e] = blocks[:, :, r0 + a:r1 + a, :, e:e + ow].transpose(0, 1, 3, 5, 2, 4)
            return cols
        cols6 = cols.reshape(n, c, kh, kw, b, ow)
        for i in range(kh):
            for j in range(kw):
                cols6[:, :, i, j] = xpad[self._window(i, j, r0, r1)]
        return cols

    def fold(self, cols, gpad, r0, r1):
        """col2im of output rows r0..r1: add columns (N, C*kh*kw, (r1-r0)*OW) into the padded grid."""
        n, c = self.x_shape[:2]
        (kh, kw), ow, b = self.kernel, self.out_hw[1], r1 - r0
        if self.pointwise:
            gpad.reshape(n, c, -1)[:, :, r0 * ow:r1 * ow] += cols
            return
        cols6 = cols.reshape(n, c, kh, kw, b, ow)
        for i in range(kh):
            for j in range(kw):
                # += not =: windows overlap, and each pixel collects all its uses.
                gpad[self._window(i, j, r0, r1)] += cols6[:, :, i, j]


def im2col(x, kernel, stride, padding, dilation, out_hw=None, out=None):
    """Unfold every receptive field into columns (the whole image: one band).

    Inputs:
        x: (N, C, H, W).
        kernel, stride, padding, dilation: (h, w) pairs.
        out_hw: optional (OH, OW) no larger than the natural output size.
        out: optional array of shape (N, C*kh*kw, OH*OW) to write into.
    Returns:
        cols: (N, C * kh * kw, OH * OW), and (OH, OW).
    """
    u = Unfolding(x.shape, kernel, stride, padding, dilation, out_hw)
    return u.unfold(u.pad(x), 0, u.out_hw[0], out), u.out_hw


def col2im(cols, x_shape, kernel, stride, padding, dilation, out_hw):
    """Adjoint of :func:`im2col`: scatter-*add* columns back onto the input grid.

    Inputs:
        cols: (N, C * kh * kw, OH * OW).
        x_shape: (N, C, H, W), the shape of the image im2col unfolded.
        out_hw: (OH, OW).
    Returns:
        (N, C, H, W) with ``out[n, c, y, x] = sum of every column entry that
        im2col copied from (y, x)``; entries that came from padding are dropped.
    """
    u = Unfolding(x_shape, kernel, stride, padding, dilation, out_hw)
    gpad = u.zeros(get_array_module(cols), cols.dtype)
    u.fold(cols, gpad, 0, u.out_hw[0])
    return u.crop(gpad)
