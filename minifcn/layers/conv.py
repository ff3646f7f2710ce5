"""Conv2d and ConvTranspose2d, written once as three functions.

A convolution with weight ``W`` of shape (out, in, kh, kw) is a linear map
``y = C x`` (plus bias). Everything both layers need is:

* :func:`conv2d_forward`      ``y  = C x``        (im2col, then one product)
* :func:`conv2d_input_grad`   ``dx = C^T dy``     (one product, then col2im; or, at
  stride 1 or when the stride divides the kernel, a convolution that computes the same map)
* :func:`conv2d_weight_grad`  ``dW = dy . cols^T``

each run band by band over the output rows (see :mod:`minifcn.layers.im2col`;
on the CPU a batch's bands are shared by one thread per core, :mod:`minifcn.parallel`).

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
from ..parallel import run_bands, workers_for
from ._checks import SavedInput, check_grad, check_nchw, check_same_device, need_forward, pair
from .im2col import Unfolding, conv_output_size, conv_transpose_output_size, workspace


def conv2d_forward(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``y = C x (+ b)``: for each band of output rows, im2col then one product.

    Inputs:
        x: (N, Cin, H, W); weight: (Cout, Cin, kh, kw); geometry as (h, w) pairs;
        out_hw: optional (OH, OW), at most the natural output size;
        bias: optional (Cout,), added band by band while the band is in cache.
    Returns:
        y: (N, Cout, OH, OW).

    When the stride divides the kernel and the output has fewer channels
    than a block of the input (FCN's upsampling, run backwards), the same
    map is computed without columns (:func:`_forward_by_blocks`).
    """
    xp = get_array_module(x)
    n = x.shape[0]
    cout = weight.shape[0]
    u = Unfolding(x.shape, weight.shape[2:], stride, padding, dilation, out_hw)
    if u.blocked and cout < u.x_shape[1] * u.stride[0] * u.stride[1]:
        return _forward_by_blocks(x, weight, u, bias)
    oh, ow = u.out_hw
    w2 = weight.reshape(cout, -1)                          # (Cout, Cin*kh*kw)
    y = xp.empty((n, cout, oh, ow), dtype=x.dtype)
    y3 = y.reshape(n, cout, oh * ow)
    xpad = u.pad(x)

    def one_band(worker, r0, r1):
        cols = u.unfold(xpad, r0, r1, workspace(xp, x.dtype, u.band_shape(r0, r1), _per_worker("columns", worker)))
        # (Cout, Cin*kh*kw) @ (N, Cin*kh*kw, band) -> output rows r0..r1 of every image, in place
        band = y3[:, :, r0 * ow:r1 * ow]
        xp.matmul(w2, cols, out=band)
        if bias is not None:
            band += bias.reshape(cout, 1)

    bands = list(u.bands(xp, x.itemsize, cout))
    run_bands(bands, one_band, workers_for(xp, len(bands), n))
    return y


def _forward_by_blocks(x, weight, u, bias=None):
    """``C x`` when the stride divides the kernel (``k = m*s``, dilation 1), without im2col.

    Cut the padded input into s x s blocks and stack each block's pixels as
    channels (space to depth): ``S[n, (c, r, t), P, Q] = xpad[n, c, P*s + r, Q*s + t]``.
    Kernel offset ``(a*s + r, e*s + t)`` of output pixel (P, Q) reads pixel
    (r, t) of block (P + a, Q + e), so::

        y[n, o, P, Q] = sum_{a, e < m} Z[n, (a, e, o), P + a, Q + e]
        Z = W_blocks @ S,   W_blocks[(a, e, o), (c, r, t)] = W[o, c, a*s + r, e*s + t]

    one product for every block and offset, then m*m shifted sums of small
    arrays. Columns would hold ``Cin*s*s*m*m`` numbers per output pixel, Z
    only ``m*m*Cout``: for upscore8's backward (21 -> 21 channels, s = 8)
    that is 5376 against 84. This is the adjoint of
    :func:`_input_grad_by_blocks` (a convolution, then depth to space).
    """
    xp = get_array_module(x)
    n, cin = u.x_shape[:2]
    cout, (kh, kw), (sh, sw) = weight.shape[0], weight.shape[2:], u.stride
    mh, mw = kh // sh, kw // sw
    oh, ow = u.out_hw
    blocks = u.blocks(u.pad(x))                                  # (N, Cin, HS, s, WS, s)
    hs, ws = blocks.shape[2], blocks.shape[4]                    # HS >= OH + m - 1
    s2d = xp.ascontiguousarray(blocks.transpose(0, 1, 3, 5, 2, 4)).reshape(n, cin * sh * sw, hs * ws)
    w_blocks = xp.ascontiguousarray(
        weight.reshape(cout, cin, mh, sh, mw, sw).transpose(2, 4, 0, 1, 3, 5)).reshape(mh * mw * cout, -1)
    z = xp.matmul(w_blocks, s2d).reshape(n, mh, mw, cout, hs, ws)
    y = z[:, 0, 0, :, :oh, :ow].copy()
    for a in range(mh):
        for e in range(mw):
            if a or e:
                y += z[:, a, e, :, a:a + oh, e:e + ow]
    if bias is not None:
        y += bias.reshape(1, cout, 1, 1)
    return y


def conv2d_input_grad(dy, weight, x_shape, stride, padding, dilation):
    """``dx = C^T dy``: the gradient of a convolution with respect to its input.

    Inputs:
        dy: (N, Cout, OH, OW); weight: (Cout, Cin, kh, kw); x_shape: (N, Cin, H, W).
    Returns:
        dx: (N, Cin, H, W).

    One linear map, four ways to compute it, chosen by the geometry (each is
    checked against the loop reference in the tests):

    1. 1x1, stride 1, no padding: one product ``W^T dy``.
    2. stride 1: a convolution of dy with the flipped kernel
       (:func:`_input_grad_by_flipped_kernel`).
    3. the stride divides the kernel: a sub-pixel convolution
       (:func:`_input_grad_by_blocks`).
    4. anything else: for each band of rows, the product ``W^T dy`` gives the
       columns' gradient, and col2im adds it back onto the input grid.
    """
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    u = Unfolding(x_shape, weight.shape[2:], stride, padding, dilation, (oh, ow))
    wt = weight.reshape(cout, -1).T                        # (Cin*kh*kw, Cout)
    dy3 = dy.reshape(n, cout, oh * ow)
    if u.pointwise:  # 1x1: the columns are the input gradient itself
        return xp.matmul(wt, dy3).reshape(x_shape)
    if _flipped_kernel_applies(u):
        return _input_grad_by_flipped_kernel(dy, weight, u)
    if u.blocked:
        return _input_grad_by_blocks(dy, weight, u)
    gpad = u.zeros(xp, dy.dtype)
    for r0, r1 in u.bands(xp, dy.itemsize, cout):
        dcols = workspace(xp, dy.dtype, u.band_shape(r0, r1))
        xp.matmul(wt, dy3[:, :, r0 * ow:r1 * ow], out=dcols)  # (N, Cin*kh*kw, band)
        u.fold(dcols, gpad, r0, r1)
    return u.crop(gpad)


def _full_padding(u):
    """Padding that turns a stride-1 convolution's output back into its input size: d(k-1) - p."""
    return tuple((k - 1) * d - p for k, d, p in zip(u.kernel, u.dilation, u.padding))


def _flipped_kernel_applies(u):
    """Stride 1, dy reaches every input pixel (not past an output_padding), and
    the input has no more pixels than dy (not fc6's 7x7 on a small map, where
    the flipped convolution would multiply mostly padding)."""
    (h, w), (oh, ow) = u.x_shape[2:], u.out_hw
    full = _full_padding(u)
    return (u.stride == (1, 1) and min(full) >= 0
            and (oh + full[0] - u.padding[0], ow + full[1] - u.padding[1]) == (h, w) and h * w <= oh * ow)


def _input_grad_by_flipped_kernel(dy, weight, u):
    """``C^T dy`` at stride 1: itself a convolution.

    dy padded by ``d(k-1) - p`` and correlated with the kernel flipped in space
    and with in/out channels swapped::

        dx[n, c, y, x] = sum_{o,i,j} W[o, c, kh-1-i, kw-1-j] * dypad[n, o, y + i*dh, x + j*dw]

    An im2col of dy and a product with Cin rows replace the product with only
    Cout inner terms (slow in BLAS when Cout is small) and the kh*kw
    read-modify-write passes of col2im.
    """
    xp = get_array_module(dy)
    flipped = xp.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # (Cin, Cout, kh, kw)
    return conv2d_forward(dy, flipped, (1, 1), _full_padding(u), u.dilation, out_hw=u.x_shape[2:])


def _input_grad_by_blocks(dy, weight, u):
    """``C^T dy`` when the stride divides the kernel (``k = m*s``, dilation 1): a sub-pixel convolution.

    Padded input pixel ``(P*s + r, Q*s + t)`` (0 <= r, t < s) collects
    ``dy[o, P - a, Q - e] * W[o, c, a*s + r, e*s + t]`` over ``a, e < m``. So
    each s x s block of the input gradient is one pixel of a stride-1
    convolution of dy (padded by m - 1, kernel m x m flipped) with
    ``Cin * s * s`` output channels ``(c, r, t)``, and a depth-to-space
    reshuffle lays those channels out as the block's pixels. For FCN's
    upsampling (k = 2s) that is a 2x2 convolution and one copy, instead of
    k*k overlapping strided adds.
    """
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    cin, (kh, kw), (sh, sw) = weight.shape[1], weight.shape[2:], u.stride
    mh, mw = kh // sh, kw // sw
    # blocked[(c, r, t), o, a', e'] = W[o, c, (m-1-a')*s + r, (m-1-e')*s + t]
    blocked = weight.reshape(cout, cin, mh, sh, mw, sw)[:, :, ::-1, :, ::-1, :]
    blocked = xp.ascontiguousarray(blocked.transpose(1, 3, 5, 0, 2, 4)).reshape(cin * sh * sw, cout, mh, mw)
    per_block = conv2d_forward(dy, blocked, (1, 1), (mh - 1, mw - 1), (1, 1))  # (N, Cin*sh*sw, HB, WB)
    hb, wb = per_block.shape[2:]                                               # HB = OH + m - 1
    gpad = u.zeros(xp, dy.dtype, blocked=True)
    # depth to space: block (P, Q) of channel c gets per_block[n, (c, r, t), P, Q] at pixel (r, t)
    u.blocks(gpad)[:, :, :hb, :, :wb, :] = per_block.reshape(n, cin, sh, sw, hb, wb).transpose(0, 1, 4, 2, 5, 3)
    return u.crop(gpad)


def conv2d_weight_grad(dy, x, weight_shape, stride, padding, dilation, accumulate=None):
    """``dW[o, k] = sum over images n and positions l of dy[n, o, l] * cols[n, k, l]``.

    Inputs:
        dy: (N, Cout, OH, OW); x: (N, Cin, H, W), the input that was unfolded;
        accumulate: optional array of weight_shape (a parameter's ``.grad``)
            that dW is added into, instead of a new array.
    Returns:
        dW: weight_shape = (Cout, Cin, kh, kw) (``accumulate`` itself when given).
    """
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    u = Unfolding(x.shape, weight_shape[2:], stride, padding, dilation, (oh, ow))
    dy3 = dy.reshape(n, cout, oh * ow)
    if accumulate is None:
        accumulate = xp.zeros(weight_shape, dtype=dy.dtype)
    elif tuple(accumulate.shape) != tuple(weight_shape) or not accumulate.flags.c_contiguous:
        raise ValueError(f"conv2d_weight_grad: accumulate must be a contiguous array of shape "
                         f"{tuple(weight_shape)}, got shape {tuple(accumulate.shape)} "
                         f"(C-contiguous: {bool(accumulate.flags.c_contiguous)})")
    dw = accumulate.reshape(cout, u.rows)  # a view, so the += below lands in accumulate
    xpad = u.pad(x)
    bands = list(u.bands(xp, x.itemsize, cout))
    workers = workers_for(xp, len(bands), n)
    # one sum per worker (worker 0 adds straight into dw), added up in worker order
    partial = [dw] + [xp.zeros_like(dw) for _ in range(workers - 1)]

    def one_band(worker, r0, r1):
        cols = u.unfold(xpad, r0, r1, workspace(xp, x.dtype, u.band_shape(r0, r1), _per_worker("columns", worker)))
        _add_products(partial[worker], dy3[:, :, r0 * ow:r1 * ow], cols, _per_worker("products", worker))

    run_bands(bands, one_band, workers)
    for extra in partial[1:]:
        dw += extra
    return accumulate


def _per_worker(name, worker):
    """The name of a worker's scratch buffer; worker 0 (or the only one) shares the serial code's."""
    return name if worker == 0 else f"{name}{worker}"


def _add_products(dw, dy3, cols, scratch="products"):
    """dw (Cout, K) += sum_n dy3[n] @ cols[n]^T, for dy3 (N, Cout, L) and cols (N, K, L)."""
    xp = get_array_module(dw)
    n, cout, length = dy3.shape
    k = cols.shape[1]
    if length >= k and length >= cout:
        # Many positions (early layers): cols @ dy^T runs several times faster in
        # OpenBLAS than dy @ cols^T, and the (N, K, Cout) results are small.
        dw += xp.matmul(cols, dy3.transpose(0, 2, 1)).sum(axis=0).T
        return
    # Few positions, large weight (fc6: 4096 x 25088): one product over the
    # batch folded into the positions (copies of small arrays when N > 1),
    # into a reused buffer the size of the weight, then one add.
    dy2 = dy3.transpose(1, 0, 2).reshape(cout, n * length)
    cols2 = cols.transpose(1, 0, 2).reshape(k, n * length)
    dw += xp.matmul(dy2, cols2.T, out=workspace(xp, dw.dtype, dw.shape, scratch))


def _check_same_dtype(x, weight, layer):
    check_same_device(x, weight, layer)
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
    Generator or seed) control the initial weights. Set the attribute
    ``input_grad = False`` on a first layer whose input needs no gradient (an
    image): ``backward`` then only accumulates dW and db and returns None.

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
        self.input_grad = True
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
        y = conv2d_forward(x, self.weight.data, self.stride, self.padding, self.dilation,
                           bias=None if self.bias is None else self.bias.data)
        # Keep the input, not its columns: backward unfolds it again, band by
        # band (one im2col more, but no columns held per layer), and check it is unchanged (SavedInput).
        self._cache = (SavedInput(x), y.shape)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx: (N, Cin, H, W) (None if not input_grad); adds dW, db into .grad."""
        saved, y_shape = need_forward(self._cache, "Conv2d")
        check_grad(dy, y_shape, "Conv2d")
        x = saved.check("Conv2d")
        if self.weight.trainable:
            conv2d_weight_grad(dy, x, self.weight.shape, self.stride, self.padding, self.dilation,
                               accumulate=self.weight.grad)
        if self.bias is not None and self.bias.trainable:
            self.bias.grad += dy.sum(axis=(0, 2, 3))
        if not self.input_grad:
            return None
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
        self._cache = (SavedInput(x), out_shape)
        return y

    def backward(self, dy):
        """dy: (N, Cout, OH, OW) -> dx: (N, Cin, H, W); adds dW, db into .grad."""
        saved, out_shape = need_forward(self._cache, "ConvTranspose2d")
        check_grad(dy, out_shape, "ConvTranspose2d")
        x = saved.check("ConvTranspose2d")
        # Backward of the transpose = forward of the convolution (cut to x's size
        # when output_padding added rows the convolution would map past it).
        dx = conv2d_forward(dy, self.weight.data, self.stride, self.padding, self.dilation,
                            out_hw=x.shape[2:])
        if self.weight.trainable:  # FCN's fixed bilinear upsampling skips this product
            # the convolution's weight gradient with input dy and upstream gradient x
            conv2d_weight_grad(x, dy, self.weight.shape, self.stride, self.padding, self.dilation,
                               accumulate=self.weight.grad)
        if self.bias is not None and self.bias.trainable:
            self.bias.grad += dy.sum(axis=(0, 2, 3))
        return dx

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, output_padding={self.output_padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}")
