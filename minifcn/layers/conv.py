"""Conv2d and ConvTranspose2d, written once as three functions.

A convolution with weight ``W`` of shape (out, in, kh, kw) is a linear map
``y = C x`` (plus bias). Everything both layers need is:

* :func:`conv2d_forward`      ``y  = C x``        (im2col, then one product)
* :func:`conv2d_input_grad`   ``dx = C^T dy``     (one product, then col2im)
* :func:`conv2d_weight_grad`  ``dW = dy . cols^T``

A transposed convolution *is* ``C^T``: its forward is
``conv2d_input_grad`` and its backward is ``conv2d_forward`` (for the input
gradient) plus ``conv2d_weight_grad`` with the roles of input and upstream
gradient exchanged. PyTorch stores its weight as (in, out, kh, kw): exactly
the (out, in, kh, kw) weight of the convolution it is the transpose of.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..module import Module, Parameter
from ._checks import check_grad, check_nchw, need_forward, pair
from .im2col import col2im, conv_output_size, conv_transpose_output_size, im2col, workspace


def channels_first(a):
    """(N, C, H, W) -> (C, N*H*W): the column layout of im2col (a view when N == 1)."""
    n, c, h, w = a.shape
    if n == 1:
        return a.reshape(c, h * w)
    return get_array_module(a).ascontiguousarray(a.transpose(1, 0, 2, 3)).reshape(c, n * h * w)


def batch_first(a, n, h, w):
    """(C, N*H*W) -> (N, C, H, W), inverse of :func:`channels_first`."""
    c = a.shape[0]
    if n == 1:
        return a.reshape(1, c, h, w)
    return get_array_module(a).ascontiguousarray(a.reshape(c, n, h, w).transpose(1, 0, 2, 3))


def conv2d_forward(x, weight, stride, padding, dilation, out_hw=None):
    """``y = C x``.

    Inputs:
        x: (N, Cin, H, W); weight: (Cout, Cin, kh, kw); geometry as (h, w) pairs.
    Returns:
        y: (N, Cout, OH, OW), and cols: (Cin*kh*kw, N*OH*OW), the unfolded
        input, which lives in a shared workspace: use it (for the weight
        gradient) before the next convolution runs.
    """
    xp = get_array_module(x)
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    oh, ow = out_hw or (conv_output_size(h, kh, stride[0], padding[0], dilation[0]),
                        conv_output_size(w, kw, stride[1], padding[1], dilation[1]))
    out = workspace(xp, x.dtype, (cin * kh * kw, n * oh * ow))
    cols, _ = im2col(x, (kh, kw), stride, padding, dilation, (oh, ow), out=out)
    y = weight.reshape(cout, -1) @ cols  # (Cout, Cin*kh*kw) @ (Cin*kh*kw, N*OH*OW)
    return batch_first(y, n, oh, ow), cols


def conv2d_input_grad(dy, weight, x_shape, stride, padding, dilation):
    """``dx = C^T dy``: the gradient of a convolution with respect to its input.

    Inputs:
        dy: (N, Cout, OH, OW); weight: (Cout, Cin, kh, kw); x_shape: (N, Cin, H, W).
    Returns:
        dx: (N, Cin, H, W).
    """
    xp = get_array_module(dy)
    oh, ow = dy.shape[2:]
    cout = weight.shape[0]
    dy2 = channels_first(dy)                                     # (Cout, N*OH*OW)
    dcols = workspace(xp, dy.dtype, (weight[0].size, dy2.shape[1]))
    xp.matmul(weight.reshape(cout, -1).T, dy2, out=dcols)        # (Cin*kh*kw, N*OH*OW)
    return col2im(dcols, x_shape, weight.shape[2:], stride, padding, dilation, (oh, ow))


def conv2d_weight_grad(dy, cols, weight_shape):
    """``dW[o, k] = sum over batch and positions of dy[n, o, l] * cols[k, (n, l)]``.

    Inputs:
        dy: (N, Cout, OH, OW); cols: (Cin*kh*kw, N*OH*OW), im2col of the input.
    Returns:
        dW: weight_shape = (Cout, Cin, kh, kw).
    """
    dy2 = channels_first(dy)  # (Cout, N*OH*OW)
    if cols.shape[1] > cols.shape[0]:
        # Many positions (early layers): cols @ dy^T runs several times faster in
        # OpenBLAS than dy @ cols^T; transposing the small (Cin*kh*kw, Cout) result is cheap.
        return (cols @ dy2.T).T.reshape(weight_shape)
    # Few positions, long rows (fc6: 25088 x 64): dy @ cols^T gives the weight layout
    # directly, so the caller's += runs over contiguous memory.
    return (dy2 @ cols.T).reshape(weight_shape)


def _check_same_dtype(x, weight, layer):
    if x.dtype != weight.dtype:
        raise ValueError(
            f"{layer}: input dtype {x.dtype} does not match weight dtype {weight.dtype}; "
            f"cast one of them (layer.astype({x.dtype.name!r}) or x.astype({weight.dtype.name!r}))"
        )


def _uniform_init(shape, fan_in, dtype, rng):
    """PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


class Conv2d(Module):
    """2-D convolution (cross-correlation, as in every DL framework).

    ``y[n, o, p, q] = b[o] + sum_{c,i,j} W[o, c, i, j] * xpad[n, c, p*s + i*d, q*s + j*d]``

    Args (PyTorch meanings): in_channels, out_channels, kernel_size, stride=1,
    padding=0 (zeros), dilation=1, bias=True; each geometric argument an int
    or an (h, w) pair. ``dtype`` (float32 default) and ``rng`` (a NumPy
    Generator or seed) control the initial weights.

    Shapes: input (N, Cin, H, W) -> output (N, Cout, OH, OW) with
    ``OH = floor((H + 2p - d(k-1) - 1) / s) + 1``. Weight (Cout, Cin, kh, kw), bias (Cout,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"Conv2d: channel counts must be >= 1, got in={in_channels}, out={out_channels}")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        rng = np.random.default_rng(rng)
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(_uniform_init((self.out_channels, self.in_channels, *self.kernel_size), fan_in, dtype, rng))
        self.bias = Parameter(_uniform_init((self.out_channels,), fan_in, dtype, rng)) if bias else None
        self._cache = None

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        return (n, self.out_channels,
                conv_output_size(h, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
                conv_output_size(w, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]))

    def forward(self, x):
        """x: (N, Cin, H, W) -> y: (N, Cout, OH, OW)."""
        check_nchw(x, "Conv2d", self.in_channels)
        _check_same_dtype(x, self.weight.data, "Conv2d")
        for axis, size in ((0, x.shape[2]), (1, x.shape[3])):
            span = self.dilation[axis] * (self.kernel_size[axis] - 1) + 1
            if size + 2 * self.padding[axis] < span:
                raise ValueError(
                    f"Conv2d: kernel extent {span} (kernel_size={self.kernel_size}, dilation={self.dilation}) "
                    f"is larger than the padded input {'HW'[axis]}={size}+2*{self.padding[axis]} "
                    f"(input shape {tuple(x.shape)})")
        y, _ = conv2d_forward(x, self.weight.data, self.stride, self.padding, self.dilation)
        if self.bias is not None:
            y += self.bias.data.reshape(1, -1, 1, 1)
        # Keep the input, not its columns: backward unfolds it again into the
        # shared workspace (one im2col more, but no columns held per layer).
        self._cache = (x, y.shape)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx: (N, Cin, H, W); adds dW, db into .grad."""
        x, y_shape = need_forward(self._cache, "Conv2d")
        check_grad(dy, y_shape, "Conv2d")
        if self.weight.trainable:
            xp = get_array_module(x)
            out = workspace(xp, x.dtype, (self.weight.data[0].size, dy.shape[0] * dy.shape[2] * dy.shape[3]))
            cols, _ = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation, dy.shape[2:], out=out)
            self.weight.grad += conv2d_weight_grad(dy, cols, self.weight.shape)
        if self.bias is not None and self.bias.trainable:
            self.bias.grad += dy.sum(axis=(0, 2, 3))
        return conv2d_input_grad(dy, self.weight.data, x.shape, self.stride, self.padding, self.dilation)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")


class ConvTranspose2d(Module):
    """Transposed convolution ("deconvolution"): the adjoint of :class:`Conv2d`.

    With the same weight ``W`` (in, out, kh, kw) and geometry, a Conv2d from
    ``out`` to ``in`` channels is the matrix ``C``; this layer computes
    ``y = C^T x + b``. So::

        forward(x)   = conv2d_input_grad(x, W)      # C^T x: product, then col2im
        backward(dy) = conv2d_forward(dy, W)        # C dy:  im2col, then product
        dW           = conv2d_weight_grad(x, im2col(dy))

    Args (PyTorch meanings): in_channels, out_channels, kernel_size, stride=1,
    padding=0 (removes rows/cols from the output), output_padding=0 (adds them
    on the bottom/right; must be smaller than stride or dilation), dilation=1, bias=True.

    Shapes: input (N, Cin, H, W) -> output (N, Cout, OH, OW) with
    ``OH = (H-1)s - 2p + d(k-1) + output_padding + 1``. Weight (Cin, Cout, kh, kw), bias (Cout,).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, bias=True, dtype=np.float32, rng=None):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"ConvTranspose2d: channel counts must be >= 1, got in={in_channels}, out={out_channels}")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        self.output_padding = pair(output_padding, "output_padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        for a in (0, 1):
            if self.output_padding[a] >= max(self.stride[a], self.dilation[a]):
                raise ValueError(
                    f"ConvTranspose2d: output_padding={self.output_padding} must be smaller than either "
                    f"stride={self.stride} or dilation={self.dilation}")
        rng = np.random.default_rng(rng)
        # PyTorch computes fan_in from weight.shape[1] * kh * kw = out_channels * kh * kw.
        fan_in = self.out_channels * self.kernel_size[0] * self.kernel_size[1]
        self.weight = Parameter(_uniform_init((self.in_channels, self.out_channels, *self.kernel_size), fan_in, dtype, rng))
        self.bias = Parameter(_uniform_init((self.out_channels,), fan_in, dtype, rng)) if bias else None
        self._cache = None

    def output_shape(self, input_shape):
        n, _, h, w = input_shape
        return (n, self.out_channels) + tuple(
            conv_transpose_output_size(size, self.kernel_size[a], self.stride[a], self.padding[a],
                                       self.output_padding[a], self.dilation[a])
            for a, size in ((0, h), (1, w)))

    def forward(self, x):
        """x: (N, Cin, H, W) -> y: (N, Cout, OH, OW)."""
        check_nchw(x, "ConvTranspose2d", self.in_channels)
        _check_same_dtype(x, self.weight.data, "ConvTranspose2d")
        out_shape = self.output_shape(x.shape)
        if min(out_shape[2:]) < 1:
            raise ValueError(f"ConvTranspose2d: output size {out_shape[2:]} is not positive for input shape "
                             f"{tuple(x.shape)} (padding={self.padding} removes too much)")
        # Forward of the transpose = input-gradient of the convolution it transposes.
        y = conv2d_input_grad(x, self.weight.data, out_shape, self.stride, self.padding, self.dilation)
        if self.bias is not None:
            y += self.bias.data.reshape(1, -1, 1, 1)
        self._cache = (x, out_shape)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx: (N, Cin, H, W); adds dW, db into .grad."""
        x, out_shape = need_forward(self._cache, "ConvTranspose2d")
        check_grad(dy, out_shape, "ConvTranspose2d")
        # Backward of the transpose = forward of the convolution (cut to x's size
        # when output_padding added rows the convolution would map past it).
        dx, cols = conv2d_forward(dy, self.weight.data, self.stride, self.padding, self.dilation,
                                  out_hw=x.shape[2:])
        if self.weight.trainable:  # FCN's fixed bilinear upsampling skips this product
            self.weight.grad += conv2d_weight_grad(x, cols, self.weight.shape)
        if self.bias is not None and self.bias.trainable:
            self.bias.grad += dy.sum(axis=(0, 2, 3))
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")
