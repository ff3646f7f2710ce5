"""Conv2d and ConvTranspose2d, written once as three linear maps.

A convolution with weight ``W`` (out, in, kh, kw) is a matrix ``y = C x`` (plus bias):

* :func:`conv2d_forward`      ``y  = C x``      im2col of the whole input, one product, bias
* :func:`conv2d_input_grad`   ``dx = C^T dy``   one product, then col2im (the adjoint of im2col)
* :func:`conv2d_weight_grad`  ``dW = dy cols^T``  im2col, one product

These are the *textbook routes*. A transposed convolution *is* ``C^T``: its forward is ``conv2d_input_grad``,
its input gradient ``conv2d_forward``, its weight gradient ``conv2d_weight_grad`` with input and upstream
gradient exchanged (its PyTorch weight (in, out, kh, kw) is the (out, in, kh, kw) weight of C).

The layers ask :func:`minifcn.routes.select` for the route of each map: the textbook one under
``MINIFCN_ROUTE=textbook`` (or ``with minifcn.route("textbook")``), else perhaps a fast route of
:mod:`minifcn.layers.conv_fast`. ``minifcn explain routes`` lists which runs where, and why.
"""
import numpy as np

from ..backend import get_array_module
from ..module import Module, Parameter
from ..routes import ACROSS_CALLS, register, run
from ._checks import (SavedInput, add_or_store, check_accumulate, check_grad, check_kernel_fits, check_nchw,
                      check_positive_output, check_same_dtype, need_forward, pair)
from .columns import col2im, conv_output_size, conv_transpose_output_size, im2col
from .conv_fast import BIAS_GRAD, FORWARD, INPUT_GRAD, KEEP_COLUMNS, WEIGHT_GRAD, conv_facts
from .init import uniform_init as _uniform_init  # (tests replace it to build zero models fast)

@register(FORWARD, "textbook", textbook=True, reason="im2col of the whole input, one product, bias")
def conv2d_forward(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``y = C x (+ b)``. x (N, Cin, H, W), weight (Cout, Cin, kh, kw), geometry as (h, w) pairs,
    out_hw an optional (OH, OW) at most the natural size, bias (Cout,) -> y (N, Cout, OH, OW)."""
    cols, (oh, ow) = im2col(x, weight.shape[2:], stride, padding, dilation, out_hw)  # (N, Cin*kh*kw, OH*OW)
    y = weight.reshape(weight.shape[0], -1) @ cols                                   # (N, Cout, OH*OW)
    if bias is not None:
        y += bias.reshape(-1, 1)
    return y.reshape(x.shape[0], weight.shape[0], oh, ow)


@register(INPUT_GRAD, "textbook", textbook=True, reason="one product W^T dy, then col2im")
def conv2d_input_grad(dy, weight, x_shape, stride, padding, dilation):
    """``dx = C^T dy``. dy (N, Cout, OH, OW), weight (Cout, Cin, kh, kw), x_shape (N, Cin, H, W) -> dx."""
    n, cout, oh, ow = dy.shape
    dcols = weight.reshape(cout, -1).T @ dy.reshape(n, cout, oh * ow)               # (N, Cin*kh*kw, OH*OW)
    return col2im(dcols, x_shape, weight.shape[2:], stride, padding, dilation, (oh, ow))


@register(WEIGHT_GRAD, "textbook", textbook=True, reason="im2col of the whole input, one product dy cols^T")
def conv2d_weight_grad(dy, x, weight_shape, stride, padding, dilation, accumulate=None, overwrite=False):
    """``dW[o, k] = sum_{n, l} dy[n, o, l] cols[n, k, l]``. dy (N, Cout, OH, OW), x the input; added into
    ``accumulate`` (a contiguous array of weight_shape, e.g. a parameter's ``.grad``) when given, or
    stored there where ``overwrite`` (the first pass after a lazy zero_grad; every weight route takes both)."""
    n, cout, oh, ow = dy.shape
    accumulate = check_accumulate(accumulate, weight_shape, get_array_module(dy), dy.dtype, "conv2d_weight_grad")
    cols, _ = im2col(x, weight_shape[2:], stride, padding, dilation, (oh, ow))     # (N, Cin*kh*kw, OH*OW)
    dw = (dy.reshape(n, cout, oh * ow) @ cols.transpose(0, 2, 1)).sum(axis=0)      # (Cout, Cin*kh*kw)
    return add_or_store(accumulate, dw.reshape(weight_shape), overwrite)


@register(BIAS_GRAD, "textbook", textbook=True, reason="the sum of dy over the batch and every position")
def conv_bias_grad(dy):
    """``db[o] = sum_{n, p, q} dy[n, o, p, q]``. dy (N, Cout, OH, OW) -> db (Cout,)."""
    return dy.sum(axis=(0, 2, 3))


class _Convolution(Module):
    """What both layers share: geometry arguments, parameters, the bias gradient."""
    def __init__(self, name, in_channels, out_channels, kernel_size, stride, padding, dilation, bias, dtype, rng,
                 weight_shape):
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"{name}: channel counts must be >= 1, got in={in_channels}, out={out_channels}")
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride, self.padding = pair(stride, "stride", 1), pair(padding, "padding", 0)
        self.dilation = pair(dilation, "dilation", 1)
        rng = np.random.default_rng(rng)
        fan_in = weight_shape[1] * self.kernel_size[0] * self.kernel_size[1]  # PyTorch's, for both layers
        self.weight = Parameter(_uniform_init((*weight_shape, *self.kernel_size), fan_in, dtype, rng))
        self.bias = Parameter(_uniform_init((self.out_channels,), fan_in, dtype, rng)) if bias else None
        self._cache = None

    geometry = property(lambda self: (self.stride, self.padding, self.dilation), doc="(stride, padding, dilation)")

    def _bias_pass(self, y_shape):
        """The route facts of the bias gradient's pass (dy's shape), or (None, why it is skipped)."""
        if self.bias is None:
            return None, "no bias"
        return (BIAS_GRAD, (tuple(y_shape),)) if self.bias.trainable else (None, "bias is fixed")

    def _bias_grad(self, passes, dy):
        if passes["bias grad"][0] is not None:
            grad, overwrite = self.bias.grad_for_backward()
            add_or_store(grad, run(*passes["bias grad"], dy), overwrite)

    def extra_repr(self):
        extra = f"output_padding={self.output_padding}, " if hasattr(self, "output_padding") else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, {extra}dilation={self.dilation}, bias={self.bias is not None}")


class Conv2d(_Convolution):
    """2-D convolution (cross-correlation, as in every DL framework).

    ``y[n, o, p, q] = b[o] + sum_{c,i,j} W[o, c, i, j] * xpad[n, c, p*s + i*d, q*s + j*d]``

    Args (PyTorch meanings): in_channels, out_channels, kernel_size, stride=1, padding=0 (zeros),
    dilation=1, bias=True (ints or (h, w) pairs); dtype (float32) and rng (Generator or seed) for the
    initial weights. ``input_grad = False`` on a first layer (an image needs no gradient): backward
    then only accumulates dW and db and returns None. ``input_grad_up_to_runs = True`` (off by default):
    the layer's dx only feeds the parameter gradients of the layers below, and the runs of repeated lines
    in its input stay for any parameters (FCN's padding); then the input gradient may be one exact only
    up to those runs (:mod:`minifcn.layers.line_runs`), which costs a fraction of ``C^T dy``.
    Shapes: (N, Cin, H, W) -> (N, Cout, OH, OW), ``OH = floor((H + 2p - d(k-1) - 1) / s) + 1``;
    weight (Cout, Cin, kh, kw), bias (Cout,). Loop twin: :func:`minifcn.reference.conv2d` and
    ``conv2d_backward``. Routes: :meth:`route_facts` names the operation of each pass.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 bias=True, dtype=np.float32, rng=None):
        super().__init__("Conv2d", in_channels, out_channels, kernel_size, stride, padding, dilation, bias, dtype,
                         rng, (int(out_channels), int(in_channels)))
        self.input_grad = True
        self.input_grad_up_to_runs = False
        self._across_calls = {}  # what the fast routes keep from call to call (routes.ACROSS_CALLS)

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_channels) + tuple(
            conv_output_size(input_shape[2 + a], self.kernel_size[a], *(g[a] for g in self.geometry)) for a in (0, 1))

    def route_facts(self, x_shape):
        """Pass -> (operation, facts for :func:`minifcn.routes.select`), or (None, why it is skipped)."""
        facts = conv_facts(x_shape, self.weight.shape, *self.geometry)
        return {"forward": (FORWARD, facts),
                "input grad": ((INPUT_GRAD, (*facts, self.input_grad_up_to_runs)) if self.input_grad
                               else (None, "input_grad is off")),
                "weight grad": (WEIGHT_GRAD, facts) if self.weight.trainable else (None, "weight is fixed"),
                "bias grad": self._bias_pass(self.output_shape(x_shape))}

    def forward(self, x):
        """x: (N, Cin, H, W) -> y: (N, Cout, OH, OW)."""
        check_nchw(x, "Conv2d", self.in_channels)
        check_same_dtype(x, self.weight.data, "Conv2d")
        check_kernel_fits(x.shape, self.kernel_size, self.padding, self.dilation, "Conv2d")
        bias = None if self.bias is None else self.bias.data
        # what a route found out about x (its runs of repeated lines) or made of it (its columns), for
        # backward; what it keeps across calls (hints it checks against x, buffers); whether a weight
        # gradient will follow (only then are columns kept)
        memo = {ACROSS_CALLS: self._across_calls, KEEP_COLUMNS: self.training and self.weight.trainable}
        y = run(*self.route_facts(x.shape)["forward"], x, self.weight.data, *self.geometry, None, bias, memo=memo)
        self._cache = (SavedInput(x), y.shape, memo)  # the input (checked unchanged in backward)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx: (N, Cin, H, W) (None if not input_grad); adds dW, db into .grad."""
        saved, y_shape, memo = need_forward(self._cache, "Conv2d")
        check_grad(dy, y_shape, "Conv2d")
        x = saved.check("Conv2d")
        passes = self.route_facts(x.shape)
        if self.weight.trainable:
            grad, overwrite = self.weight.grad_for_backward()  # overwrite: the first pass after a lazy zero_grad
            run(*passes["weight grad"], dy, x, self.weight.shape, *self.geometry, accumulate=grad,
                overwrite=overwrite, memo=memo)
        self._bias_grad(passes, dy)
        if not self.input_grad:
            return None
        return run(*passes["input grad"], dy, self.weight.data, x.shape, *self.geometry, memo=memo)


class ConvTranspose2d(_Convolution):
    """Transposed convolution ("deconvolution"): ``y = C^T x + b``, the adjoint of :class:`Conv2d`.

    ``C`` is the Conv2d from ``out`` to ``in`` channels with the same weight ``W`` (in, out, kh, kw)
    and geometry, so forward = conv2d_input_grad(x, W); backward = conv2d_forward(dy, W) and
    dW = conv2d_weight_grad(x, dy) (input and upstream gradient exchanged).

    Args (PyTorch meanings): in_channels, out_channels, kernel_size, stride=1, padding=0 (removes rows
    and columns of the output), output_padding=0 (adds them on the bottom/right; smaller than stride
    or dilation), dilation=1, bias=True. Loop twin: :func:`minifcn.reference.conv_transpose2d`.
    Shapes: (N, Cin, H, W) -> (N, Cout, OH, OW), ``OH = (H-1)s - 2p + d(k-1) + output_padding + 1``;
    weight (Cin, Cout, kh, kw), bias (Cout,). Routes: :meth:`route_facts`.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, bias=True, dtype=np.float32, rng=None):
        super().__init__("ConvTranspose2d", in_channels, out_channels, kernel_size, stride, padding, dilation,
                         bias, dtype, rng, (int(in_channels), int(out_channels)))
        self.output_padding = pair(output_padding, "output_padding", 0)
        if any(self.output_padding[a] >= max(self.stride[a], self.dilation[a]) for a in (0, 1)):
            raise ValueError(f"ConvTranspose2d: output_padding={self.output_padding} must be smaller than either "
                             f"stride={self.stride} or dilation={self.dilation}")

    def output_shape(self, input_shape):
        return (input_shape[0], self.out_channels) + tuple(conv_transpose_output_size(
            input_shape[2 + a], self.kernel_size[a], self.stride[a], self.padding[a], self.output_padding[a],
            self.dilation[a]) for a in (0, 1))

    def route_facts(self, x_shape):
        """Pass -> (operation, facts): each pass is one of the convolution C's, on C's geometry."""
        facts = conv_facts(self.output_shape(x_shape), self.weight.shape, *self.geometry, x_shape[2:])
        return {"forward": (INPUT_GRAD, facts), "input grad": (FORWARD, facts),
                "weight grad": (WEIGHT_GRAD, facts) if self.weight.trainable else (None, "weight is fixed"),
                "bias grad": self._bias_pass(self.output_shape(x_shape))}

    def forward(self, x):
        """x: (N, Cin, H, W) -> y: (N, Cout, OH, OW): the input gradient of C."""
        check_nchw(x, "ConvTranspose2d", self.in_channels)
        check_same_dtype(x, self.weight.data, "ConvTranspose2d")
        out_shape = self.output_shape(x.shape)
        check_positive_output(out_shape, x.shape, self.padding, "ConvTranspose2d")
        y = run(*self.route_facts(x.shape)["forward"], x, self.weight.data, out_shape, *self.geometry)
        if self.bias is not None:
            y += self.bias.data.reshape(1, -1, 1, 1)
        self._cache = (SavedInput(x), out_shape)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx = C dy (N, Cin, H, W), cut to x's size; adds dW, db into .grad."""
        saved, out_shape = need_forward(self._cache, "ConvTranspose2d")
        check_grad(dy, out_shape, "ConvTranspose2d")
        x = saved.check("ConvTranspose2d")
        passes = self.route_facts(x.shape)
        dx = run(*passes["input grad"], dy, self.weight.data, *self.geometry, x.shape[2:])
        if self.weight.trainable:  # FCN's fixed bilinear upsampling skips this product
            grad, overwrite = self.weight.grad_for_backward()
            run(*passes["weight grad"], x, dy, self.weight.shape, *self.geometry, accumulate=grad, overwrite=overwrite)
        self._bias_grad(passes, dy)
        return dx

