"""Max pooling with -inf padding, ceil mode and an explicit tie rule: its two routes and the layer."""
from __future__ import annotations

import math

from ..backend import get_array_module
from ..module import Module
from ..parallel import pieces, run_pieces
from ..routes import register, run
from ._checks import check_grad, check_nchw, need_forward, pair

FORWARD, INPUT_GRAD = "maxpool_forward", "maxpool_input_grad"


def pool_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                     ceil_mode: bool = False) -> int:
    """PyTorch's rule: ``(size + 2p - d(k-1) - 1) / s + 1`` rounded down, or up in
    ceil mode, where a last window that would start in the right padding is dropped."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _window(i, j, stride, dilation, out_hw):
    """The strided slice of the padded grid that kernel offset (i, j) covers for every output pixel."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    return (slice(None), slice(None), slice(i * dh, i * dh + sh * (oh - 1) + 1, sh),
            slice(j * dw, j * dw + sw * (ow - 1) + 1, sw))


@register(FORWARD, "textbook", textbook=True, reason="one maximum and argmax pass per kernel offset")
def max_and_argmax(xpad, y, argmax, kernel, stride, dilation):
    """Fill y (N, C, OH, OW) with the window maxima of xpad, and argmax with their first index k = i*kw + j."""
    xp = get_array_module(xpad)
    kh, kw = kernel
    windows = [xpad[_window(k // kw, k % kw, stride, dilation, y.shape[2:])] for k in range(kh * kw)]  # views
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


@register(FORWARD, "pieces", reason="the textbook passes, the batch (or channels) cut into one piece per CPU core")
def max_and_argmax_in_pieces(xpad, y, argmax, kernel, stride, dilation):
    """:func:`max_and_argmax` on one piece of the batch per worker (:func:`minifcn.parallel.pieces`)."""
    run_pieces(pieces(get_array_module(xpad), xpad.shape, xpad.nbytes),
               lambda i: max_and_argmax(xpad[i], y[i], argmax[i], kernel, stride, dilation))


@register(INPUT_GRAD, "textbook", textbook=True, reason="a zero grid, then per kernel offset dy added where it is the argmax")
def scatter_to_argmax(dy, argmax, padded_hw, kernel, stride, dilation):
    """dxpad (N, C, Hp, Wp): each window's gradient dy added at its argmax (windows may overlap)."""
    xp = get_array_module(dy)
    kh, kw = kernel
    dxpad = xp.zeros(dy.shape[:2] + tuple(padded_hw), dtype=dy.dtype)
    for k in range(kh * kw):
        dxpad[_window(k // kw, k % kw, stride, dilation, dy.shape[2:])] += dy * (argmax == k)
    return dxpad


@register(INPUT_GRAD, "pieces", reason="one piece per CPU core; windows that do not overlap are written, "
                                       "not added, and tiling ones need no zero fill")
def scatter_to_argmax_in_pieces(dy, argmax, padded_hw, kernel, stride, dilation):
    """:func:`scatter_to_argmax` cut into pieces, with two shortcuts where the windows allow them."""
    xp = get_array_module(dy)
    kh, kw = kernel
    out_hw = dy.shape[2:]
    # Windows that tile the padded grid write every pixel exactly once: no zero fill first.
    tiles = (kernel == stride and dilation == (1, 1) and tuple(padded_hw) == (out_hw[0] * stride[0], out_hw[1] * stride[1]))
    overlapping = any(s < d * (k - 1) + 1 for s, d, k in zip(stride, dilation, kernel))
    dxpad = (xp.empty if tiles else xp.zeros)(dy.shape[:2] + tuple(padded_hw), dtype=dy.dtype)

    def piece(i):
        grid, grad, index = dxpad[i], dy[i], argmax[i]
        for k in range(kh * kw):
            window = grid[_window(k // kw, k % kw, stride, dilation, out_hw)]
            if overlapping:
                window += grad * (index == k)
            else:  # each input pixel is in at most one window: write, no read-modify-write
                xp.multiply(grad, index == k, out=window)

    run_pieces(pieces(xp, dxpad.shape, dxpad.nbytes), piece)
    return dxpad


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

    Routes (:mod:`minifcn.routes`): forward and backward each have a textbook
    route (:func:`max_and_argmax`, :func:`scatter_to_argmax`) and a fast one,
    ``pieces`` (the batch cut into one piece per CPU core). Loop twin:
    :func:`minifcn.reference.max_pool2d`.
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

    def _padded_size(self, size, out, a):
        # Large enough for every window, including the extra one of ceil mode.
        need = (out - 1) * self.stride[a] + self.dilation[a] * (self.kernel_size[a] - 1) + 1
        return max(size + 2 * self.padding[a], need)

    def route_facts(self, x_shape):
        """Pass -> (operation, facts for :func:`minifcn.routes.select`)."""
        return {"forward": (FORWARD, (tuple(x_shape),)), "input grad": (INPUT_GRAD, (tuple(x_shape),))}

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
        run(FORWARD, (tuple(x.shape),), xpad, y, argmax, self.kernel_size, self.stride, self.dilation)
        self._cache = (x.shape, (hp, wp), argmax)
        return y

    def backward(self, dy):
        """dy: (N, C, OH, OW) -> dx: (N, C, H, W); each window's gradient goes to its argmax."""
        x_shape, padded_hw, argmax = need_forward(self._cache, "MaxPool2d")
        check_grad(dy, argmax.shape, "MaxPool2d")
        dxpad = run(INPUT_GRAD, (tuple(x_shape),), dy, argmax, padded_hw, self.kernel_size, self.stride,
                    self.dilation)
        (ph, pw), (h, w) = self.padding, x_shape[2:]
        return dxpad[:, :, ph:ph + h, pw:pw + w]

    def extra_repr(self):
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")
