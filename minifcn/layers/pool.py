"""Max pooling with -inf padding, ceil mode and an explicit tie rule."""
from __future__ import annotations

import math

from ..backend import get_array_module
from ..module import Module
from ..parallel import pieces, run_pieces
from ._checks import check_grad, check_nchw, need_forward, pair


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's rule: ``(size + 2p - d(k-1) - 1) / s + 1`` rounded down, or up in
    ceil mode, where a last window that would start in the right padding is dropped."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


class MaxPool2d(Module):
    """2-D max pooling.

    ``y[n, c, p, q] = max_{i,j} xpad[n, c, p*s + i*d, q*s + j*d]`` where the
    padding is -inf (never zero: a zero border would beat negative inputs).

    Args (PyTorch meanings): kernel_size, stride=None (= kernel_size),
    padding=0 (at most half the kernel), dilation=1, ceil_mode=False.
    FCN's reference network uses ``MaxPool2d(2, 2, ceil_mode=True)``.

    Tie rule: when several entries of a window share the maximum, the first in
    row-major window order (smallest i, then smallest j) is the argmax and
    receives the whole gradient; the others get zero.

    Shapes: (N, C, H, W) -> (N, C, OH, OW), OH from :func:`pool_output_size`.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(self.kernel_size if stride is None else stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        self.ceil_mode = bool(ceil_mode)
        for a in (0, 1):
            if self.padding[a] > self.kernel_size[a] // 2:
                raise ValueError(f"MaxPool2d: padding={self.padding} must be at most half of kernel_size={self.kernel_size}")
        self._cache = None

    def output_shape(self, input_shape):
        n, c, h, w = input_shape
        return (n, c) + tuple(
            pool_output_size(size, self.kernel_size[a], self.stride[a], self.padding[a], self.dilation[a], self.ceil_mode)
            for a, size in ((0, h), (1, w)))

    def _window(self, i, j, out_hw):
        (sh, sw), (dh, dw), (oh, ow) = self.stride, self.dilation, out_hw
        return (slice(None), slice(None),
                slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
                slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))

    def _padded_size(self, size, out, a):
        # Large enough for every window, including the extra one of ceil mode.
        need = (out - 1) * self.stride[a] + self.dilation[a] * (self.kernel_size[a] - 1) + 1
        return max(size + 2 * self.padding[a], need)

    def forward(self, x):
        """x: (N, C, H, W) -> y: (N, C, OH, OW)."""
        check_nchw(x, "MaxPool2d")
        xp = get_array_module(x)
        n, c, h, w = x.shape
        _, _, oh, ow = self.output_shape(x.shape)
        if oh < 1 or ow < 1:
            raise ValueError(f"MaxPool2d: input {tuple(x.shape)} is smaller than the kernel "
                             f"{self.kernel_size} (padding {self.padding}, dilation {self.dilation})")
        hp, wp = self._padded_size(h, oh, 0), self._padded_size(w, ow, 1)
        ph, pw = self.padding
        if (hp, wp) != (h, w):
            xpad = xp.full((n, c, hp, wp), -math.inf, dtype=x.dtype)
            xpad[:, :, ph:ph + h, pw:pw + w] = x
        else:
            xpad = x
        kh, kw = self.kernel_size
        y = xp.empty((n, c, oh, ow), dtype=x.dtype)
        argmax = xp.empty((n, c, oh, ow), dtype=xp.uint8 if kh * kw <= 255 else xp.int32)
        # On the CPU, large batches are cut into one piece per core (minifcn.parallel).
        run_pieces(pieces(xp, x.shape, x.nbytes), lambda i: self._max_and_argmax(xpad[i], y[i], argmax[i]))
        self._cache = (x.shape, (hp, wp), argmax)
        return y

    def _max_and_argmax(self, xpad, y, argmax):
        """Fill y (N, C, OH, OW) with the window maxima of xpad, and argmax with their first index k = i*kw + j."""
        xp = get_array_module(xpad)
        kh, kw = self.kernel_size
        windows = [xpad[self._window(k // kw, k % kw, y.shape[2:])] for k in range(kh * kw)]  # views
        y[...] = windows[0]
        for window in windows[1:]:
            xp.maximum(y, window, out=y)
        # Tie rule: the argmax is the first k (row-major) whose window holds the maximum.
        # Walk k downwards keeping ``argmax = k where window_k == y``, with integer
        # arithmetic instead of a masked assignment: argmax = k + (argmax - k) * (window_k != y).
        argmax[...] = kh * kw - 1
        for k in range(kh * kw - 2, -1, -1):
            argmax -= k
            argmax *= windows[k] != y
            argmax += k

    def backward(self, dy):
        """dy: (N, C, OH, OW) -> dx: (N, C, H, W); each window's gradient goes to its argmax."""
        x_shape, (hp, wp), argmax = need_forward(self._cache, "MaxPool2d")
        check_grad(dy, argmax.shape, "MaxPool2d")
        xp = get_array_module(dy)
        n, c, h, w = x_shape
        (kh, kw), (sh, sw), (oh, ow) = self.kernel_size, self.stride, dy.shape[2:]
        # Windows that tile the padded grid (kernel = stride, no dilation) write every
        # pixel exactly once, so the grid needs no zero fill first.
        tiles = (self.kernel_size == self.stride and self.dilation == (1, 1) and (hp, wp) == (oh * sh, ow * sw))
        overlapping = any(s < d * (k - 1) + 1 for s, d, k in zip(self.stride, self.dilation, self.kernel_size))
        dxpad = (xp.empty if tiles else xp.zeros)((n, c, hp, wp), dtype=dy.dtype)

        def piece(i):
            grid, grad, index = dxpad[i], dy[i], argmax[i]
            for k in range(kh * kw):
                window = grid[self._window(k // kw, k % kw, (oh, ow))]
                if overlapping:
                    window += grad * (index == k)
                else:  # each input pixel is in at most one window: write, no read-modify-write
                    xp.multiply(grad, index == k, out=window)

        run_pieces(pieces(xp, dxpad.shape, dxpad.nbytes), piece)
        ph, pw = self.padding
        return dxpad[:, :, ph:ph + h, pw:pw + w]

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")
