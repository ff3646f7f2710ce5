"""Naive reference implementations of every layer: slow on purpose, for reading.

Each function is the textbook formula written as explicit Python loops over
batch ``n``, channels ``c``, output pixels and kernel taps, on plain NumPy
arrays. Nothing here is shared with :mod:`minifcn.layers` (no im2col, no
interpolation matrices, no output-size helpers), so the fast layers can be
tested against it as an independent oracle. Use small arrays: a loop body
runs once per (n, c_out, output pixel, c_in, tap).

Conventions (PyTorch's):

* images are ``(N, C, H, W)``; geometric arguments are ints or ``(h, w)`` pairs;
* convolution is cross-correlation, zero padding;
* a backward function takes the forward's inputs and the upstream gradient
  ``dy`` (the gradient of some scalar with respect to the forward's output)
  and returns the gradients with respect to the forward's inputs.
"""
from __future__ import annotations

import math

import numpy as np


def _pair(v):
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def _float_dtype(*arrays):
    return np.result_type(*[a.dtype for a in arrays if a is not None])


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------
def conv2d(x, w, b=None, stride=1, padding=0, dilation=1):
    """Cross-correlation with zero padding.

    ``y[n, o, p, q] = b[o] + sum_{c, i, j} w[o, c, i, j] * x[n, c, p*s - pad + i*d, q*s - pad + j*d]``
    where terms whose input index falls outside the image are zero (padding).

    Inputs:
        x: (N, Cin, H, W); w: (Cout, Cin, kh, kw); b: (Cout,) or None.
    Returns:
        y: (N, Cout, OH, OW) with ``OH = floor((H + 2*pad - d*(kh-1) - 1) / s) + 1``.
    """
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    n_, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    y = np.zeros((n_, cout, oh, ow), dtype=_float_dtype(x, w))
    for n in range(n_):
        for o in range(cout):
            for p in range(oh):
                for q in range(ow):
                    total = 0.0 if b is None else b[o]
                    for c in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                r = p * sh - ph + i * dh     # input row read by tap (i, j)
                                s = q * sw - pw + j * dw     # input column
                                if 0 <= r < h and 0 <= s < wd:
                                    total += w[o, c, i, j] * x[n, c, r, s]
                    y[n, o, p, q] = total
    return y


def conv2d_backward(x, w, dy, stride=1, padding=0, dilation=1):
    """Gradients of :func:`conv2d`: the same loops, each product's derivative.

    Every term ``w[o,c,i,j] * x[n,c,r,s]`` of ``y[n,o,p,q]`` sends
    ``dy[n,o,p,q] * w[o,c,i,j]`` to ``dx[n,c,r,s]`` and
    ``dy[n,o,p,q] * x[n,c,r,s]`` to ``dw[o,c,i,j]``; the bias gets ``dy``.

    Inputs:
        x: (N, Cin, H, W); w: (Cout, Cin, kh, kw); dy: (N, Cout, OH, OW).
    Returns:
        dx: (N, Cin, H, W), dw: (Cout, Cin, kh, kw), db: (Cout,).
    """
    (sh, sw), (ph, pw), (dh, dw_) = _pair(stride), _pair(padding), _pair(dilation)
    n_, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    _, _, oh, ow = dy.shape
    dtype = _float_dtype(x, w, dy)
    dx = np.zeros(x.shape, dtype=dtype)
    dw = np.zeros(w.shape, dtype=dtype)
    db = np.zeros((cout,), dtype=dtype)
    for n in range(n_):
        for o in range(cout):
            for p in range(oh):
                for q in range(ow):
                    g = dy[n, o, p, q]
                    db[o] += g
                    for c in range(cin):
                        for i in range(kh):
                            for j in range(kw):
                                r = p * sh - ph + i * dh
                                s = q * sw - pw + j * dw_
                                if 0 <= r < h and 0 <= s < wd:
                                    dx[n, c, r, s] += g * w[o, c, i, j]
                                    dw[o, c, i, j] += g * x[n, c, r, s]
    return dx, dw, db


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, dilation=1):
    """Transposed convolution, from its own definition (a scatter, not via conv2d).

    Each input pixel stamps a scaled copy of the kernel onto the output:
    ``x[n, ci, h, w]`` adds ``x[n, ci, h, w] * W[ci, co, i, j]`` to
    ``out[n, co, h*s - pad + i*d, w*s - pad + j*d]``; overlapping stamps add,
    and stamps falling outside the output (cut by ``padding``) are dropped.

    Inputs:
        x: (N, Cin, H, W); w: (Cin, Cout, kh, kw) (PyTorch's layout); b: (Cout,) or None.
        output_padding: extra rows/columns on the bottom/right of the output.
    Returns:
        y: (N, Cout, OH, OW) with ``OH = (H-1)*s - 2*pad + d*(kh-1) + output_padding + 1``.
    """
    (sh, sw), (ph, pw) = _pair(stride), _pair(padding)
    (oph, opw), (dh, dw) = _pair(output_padding), _pair(dilation)
    n_, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    oh = (h - 1) * sh - 2 * ph + dh * (kh - 1) + oph + 1
    ow = (wd - 1) * sw - 2 * pw + dw * (kw - 1) + opw + 1
    y = np.zeros((n_, cout, oh, ow), dtype=_float_dtype(x, w))
    for n in range(n_):
        for ci in range(cin):
            for r in range(h):
                for s in range(wd):
                    v = x[n, ci, r, s]
                    for co in range(cout):
                        for i in range(kh):
                            for j in range(kw):
                                p = r * sh - ph + i * dh   # output row this tap lands on
                                q = s * sw - pw + j * dw   # output column
                                if 0 <= p < oh and 0 <= q < ow:
                                    y[n, co, p, q] += v * w[ci, co, i, j]
    if b is not None:
        for co in range(cout):
            y[:, co] += b[co]
    return y


def conv_transpose2d_backward(x, w, dy, stride=1, padding=0, output_padding=0, dilation=1):
    """Gradients of :func:`conv_transpose2d`, from the same scatter loops.

    The term ``x[n,ci,r,s] * W[ci,co,i,j]`` added to ``y[n,co,p,q]`` sends
    ``dy[n,co,p,q] * W[ci,co,i,j]`` to ``dx[n,ci,r,s]`` and
    ``dy[n,co,p,q] * x[n,ci,r,s]`` to ``dW[ci,co,i,j]``.

    Inputs:
        x: (N, Cin, H, W); w: (Cin, Cout, kh, kw); dy: (N, Cout, OH, OW).
    Returns:
        dx: (N, Cin, H, W), dw: (Cin, Cout, kh, kw), db: (Cout,).
    """
    (sh, sw), (ph, pw), (dh, dw_) = _pair(stride), _pair(padding), _pair(dilation)
    n_, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    _, _, oh, ow = dy.shape
    dtype = _float_dtype(x, w, dy)
    dx = np.zeros(x.shape, dtype=dtype)
    dw = np.zeros(w.shape, dtype=dtype)
    db = np.zeros((cout,), dtype=dtype)
    for n in range(n_):
        for ci in range(cin):
            for r in range(h):
                for s in range(wd):
                    for co in range(cout):
                        for i in range(kh):
                            for j in range(kw):
                                p = r * sh - ph + i * dh
                                q = s * sw - pw + j * dw_
                                if 0 <= p < oh and 0 <= q < ow:
                                    dx[n, ci, r, s] += dy[n, co, p, q] * w[ci, co, i, j]
                                    dw[ci, co, i, j] += dy[n, co, p, q] * x[n, ci, r, s]
    for co in range(cout):
        db[co] = dy[:, co].sum()
    return dx, dw, db


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------
def pool_output_size(size, kernel, stride, padding, dilation=1, ceil_mode=False):
    """PyTorch's pooling length: ``(size + 2p - d(k-1) - 1) / s + 1`` rounded down
    (or up in ceil mode, dropping a last window that would start in the right padding)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (math.ceil(span / stride) if ceil_mode else math.floor(span / stride)) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1      # the last window must start inside the input or the left padding
    return out


def _pool_geometry(x_shape, kernel, stride, padding, dilation, ceil_mode):
    """Kernel, stride, padding, dilation as (h, w) pairs and the output (OH, OW)."""
    k, s = _pair(kernel), _pair(kernel if stride is None else stride)
    p, d = _pair(padding), _pair(dilation)
    out = tuple(pool_output_size(x_shape[2 + a], k[a], s[a], p[a], d[a], ceil_mode) for a in (0, 1))
    return k, s, p, d, out


def _pool_windows(x_shape, kernel, stride, padding, dilation, ceil_mode):
    """Yield ``(p, q, taps)`` for every output pixel; taps lists (row, col) in
    row-major window order, ``None`` for a tap that falls in the padding."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), (oh, ow) = _pool_geometry(
        x_shape, kernel, stride, padding, dilation, ceil_mode)
    h, w = x_shape[2:]
    for p in range(oh):
        for q in range(ow):
            taps = []
            for i in range(kh):
                for j in range(kw):
                    r, s = p * sh - ph + i * dh, q * sw - pw + j * dw
                    taps.append((r, s) if 0 <= r < h and 0 <= s < w else None)
            yield p, q, taps


def _window_argmax(x, n, c, taps):
    """Max over a window and the first (row-major) tap reaching it; padding is -inf."""
    best, where = None, None
    for tap in taps:
        value = -math.inf if tap is None else x[n, c, tap[0], tap[1]]
        if best is None or value > best:   # strictly greater: ties keep the first
            best, where = value, tap
    return best, where


def max_pool2d(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Max pooling: ``y[n, c, p, q] = max over taps (i, j) of xpad[n, c, p*s + i*d, q*s + j*d]``.

    Padding is -inf (it never wins). ``stride`` defaults to ``kernel``.

    Inputs:
        x: (N, C, H, W).
    Returns:
        y: (N, C, OH, OW), OH from :func:`pool_output_size`.
    """
    n_, c_ = x.shape[:2]
    out_hw = _pool_geometry(x.shape, kernel, stride, padding, dilation, ceil_mode)[-1]
    y = np.zeros((n_, c_, *out_hw), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for p, q, taps in _pool_windows(x.shape, kernel, stride, padding, dilation, ceil_mode):
                y[n, c, p, q] = _window_argmax(x, n, c, taps)[0]
    return y


def max_pool2d_backward(x, dy, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Gradient of :func:`max_pool2d`: each window's ``dy`` goes to its argmax
    (the first maximum in row-major window order); a padding argmax drops it.

    Inputs:
        x: (N, C, H, W); dy: (N, C, OH, OW).
    Returns:
        dx: (N, C, H, W).
    """
    dx = np.zeros(x.shape, dtype=dy.dtype)
    n_, c_ = x.shape[:2]
    for n in range(n_):
        for c in range(c_):
            for p, q, taps in _pool_windows(x.shape, kernel, stride, padding, dilation, ceil_mode):
                where = _window_argmax(x, n, c, taps)[1]
                if where is not None:
                    dx[n, c, where[0], where[1]] += dy[n, c, p, q]
    return dx


# ---------------------------------------------------------------------------
# Upsampling
# ---------------------------------------------------------------------------
def _resize_geometry(in_hw, out_hw, scale):
    """Output size and the source step per output pixel along each axis.

    With ``scale`` (a number or pair) the output is ``floor(in * scale)`` and the
    step is ``1 / scale``; with ``out_hw`` the step is ``in / out`` (PyTorch)."""
    if (out_hw is None) == (scale is None):
        raise ValueError("give exactly one of out_hw and scale")
    if scale is not None:
        sy, sx = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
        out_hw = (int(math.floor(in_hw[0] * sy)), int(math.floor(in_hw[1] * sx)))
        return out_hw, (1.0 / sy, 1.0 / sx)
    out_hw = _pair(out_hw)
    return out_hw, (in_hw[0] / out_hw[0], in_hw[1] / out_hw[1])


def upsample_nearest(x, out_hw=None, scale=None):
    """Nearest-neighbour resize (PyTorch 'nearest'): ``y[.., p, q] = x[.., src(p), src(q)]``
    with ``src(p) = min(floor(p * step), in - 1)``.

    Inputs:
        x: (N, C, H, W); exactly one of out_hw (OH, OW) and scale (number or pair).
    Returns:
        y: (N, C, OH, OW).
    """
    n_, c_, h, w = x.shape
    (oh, ow), (ry, rx) = _resize_geometry((h, w), out_hw, scale)
    y = np.zeros((n_, c_, oh, ow), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for p in range(oh):
                for q in range(ow):
                    r = min(int(math.floor(p * ry)), h - 1)
                    s = min(int(math.floor(q * rx)), w - 1)
                    y[n, c, p, q] = x[n, c, r, s]
    return y


def upsample_nearest_backward(x_shape, dy, out_hw=None, scale=None):
    """Gradient of :func:`upsample_nearest`: each ``dy`` pixel goes back to its source.

    Inputs:
        x_shape: (N, C, H, W); dy: (N, C, OH, OW).
    Returns:
        dx: (N, C, H, W).
    """
    n_, c_, h, w = x_shape
    (oh, ow), (ry, rx) = _resize_geometry((h, w), out_hw, scale)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_):
        for c in range(c_):
            for p in range(oh):
                for q in range(ow):
                    r = min(int(math.floor(p * ry)), h - 1)
                    s = min(int(math.floor(q * rx)), w - 1)
                    dx[n, c, r, s] += dy[n, c, p, q]
    return dx


def _linear_source(dst, step, in_len):
    """Half-pixel source of output ``dst`` (align_corners=False): the two input
    indices and the weight of the second one."""
    src = max((dst + 0.5) * step - 0.5, 0.0)
    i0 = min(int(math.floor(src)), in_len - 1)
    i1 = min(i0 + 1, in_len - 1)
    return i0, i1, src - i0


def _bilinear_taps(p, q, h, w, ry, rx):
    """The four (row, col, weight) taps of output pixel (p, q)."""
    r0, r1, ly = _linear_source(p, ry, h)
    s0, s1, lx = _linear_source(q, rx, w)
    return ((r0, s0, (1 - ly) * (1 - lx)), (r0, s1, (1 - ly) * lx),
            (r1, s0, ly * (1 - lx)), (r1, s1, ly * lx))


def upsample_bilinear(x, out_hw=None, scale=None):
    """Bilinear resize with half-pixel centres (PyTorch ``align_corners=False``).

    Output pixel p sits at ``src = max((p + 0.5) * step - 0.5, 0)``; it mixes
    rows ``i0 = floor(src)`` and ``i1 = min(i0 + 1, H - 1)`` with weights
    ``1 - l`` and ``l = src - i0``, and likewise along columns.

    Inputs:
        x: (N, C, H, W); exactly one of out_hw (OH, OW) and scale (number or pair).
    Returns:
        y: (N, C, OH, OW).
    """
    n_, c_, h, w = x.shape
    (oh, ow), (ry, rx) = _resize_geometry((h, w), out_hw, scale)
    y = np.zeros((n_, c_, oh, ow), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for p in range(oh):
                for q in range(ow):
                    total = 0.0
                    for r, s, weight in _bilinear_taps(p, q, h, w, ry, rx):
                        total += weight * x[n, c, r, s]
                    y[n, c, p, q] = total
    return y


def upsample_bilinear_backward(x_shape, dy, out_hw=None, scale=None):
    """Gradient of :func:`upsample_bilinear`: each ``dy`` pixel is shared among its
    four source pixels with the same weights.

    Inputs:
        x_shape: (N, C, H, W); dy: (N, C, OH, OW).
    Returns:
        dx: (N, C, H, W).
    """
    n_, c_, h, w = x_shape
    (oh, ow), (ry, rx) = _resize_geometry((h, w), out_hw, scale)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    for n in range(n_):
        for c in range(c_):
            for p in range(oh):
                for q in range(ow):
                    for r, s, weight in _bilinear_taps(p, q, h, w, ry, rx):
                        dx[n, c, r, s] += weight * dy[n, c, p, q]
    return dx


# ---------------------------------------------------------------------------
# Activations and fusion
# ---------------------------------------------------------------------------
def relu(x):
    """``y = max(x, 0)`` element by element. x: any shape -> y: same shape."""
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = x[idx] if x[idx] > 0 else 0.0
    return y


def relu_backward(x, dy):
    """``dx = dy`` where ``x > 0``, else 0 (the gradient at exactly 0 is 0). Shapes: any."""
    dx = np.zeros_like(dy)
    for idx in np.ndindex(x.shape):
        dx[idx] = dy[idx] if x[idx] > 0 else 0.0
    return dx


def dropout(x, keep, p):
    """Inverted dropout with a given mask: ``y = x / (1 - p)`` where ``keep`` is
    True, else 0. x, keep (bool): same shape -> y: same shape."""
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = x[idx] / (1.0 - p) if keep[idx] else 0.0
    return y


def dropout_backward(keep, dy, p):
    """Gradient of :func:`dropout`: ``dx = dy / (1 - p)`` where kept, else 0."""
    return dropout(dy, keep, p)


def crop(x, offset, size):
    """``y = x[:, :, oy:oy+Hr, ox:ox+Wr]`` written as a copy loop.

    Inputs: x (N, C, H, W); offset (oy, ox); size (Hr, Wr). Returns y: (N, C, Hr, Wr).
    """
    oy, ox = _pair(offset)
    hr, wr = _pair(size)
    n_, c_ = x.shape[:2]
    y = np.zeros((n_, c_, hr, wr), dtype=x.dtype)
    for n in range(n_):
        for c in range(c_):
            for p in range(hr):
                for q in range(wr):
                    y[n, c, p, q] = x[n, c, oy + p, ox + q]
    return y


def crop_backward(x_shape, dy, offset):
    """Gradient of :func:`crop`: dy lands back at the offset; elsewhere zero.

    Inputs: x_shape (N, C, H, W); dy (N, C, Hr, Wr). Returns dx: (N, C, H, W).
    """
    oy, ox = _pair(offset)
    dx = np.zeros(x_shape, dtype=dy.dtype)
    n_, c_, hr, wr = dy.shape
    for n in range(n_):
        for c in range(c_):
            for p in range(hr):
                for q in range(wr):
                    dx[n, c, oy + p, ox + q] = dy[n, c, p, q]
    return dx


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------
def _pixel_weights(labels, ignore_index, class_weight):
    """Weight of every pixel (0 for ignored ones) and the normaliser's total."""
    weights = np.zeros(labels.shape, dtype=np.float64)
    for idx in np.ndindex(labels.shape):
        label = int(labels[idx])
        if ignore_index is not None and label == ignore_index:
            continue
        weights[idx] = 1.0 if class_weight is None else float(class_weight[label])
    return weights


def _log_softmax_at(z, n, h, w):
    """log softmax over channels at one pixel, via ``log-sum-exp`` with the max
    subtracted (``exp`` of large logits would overflow)."""
    channels = z.shape[1]
    m = max(float(z[n, c, h, w]) for c in range(channels))
    lse = m + math.log(sum(math.exp(float(z[n, c, h, w]) - m) for c in range(channels)))
    return [float(z[n, c, h, w]) - lse for c in range(channels)]


def softmax_cross_entropy(logits, labels, ignore_index=255, reduction="mean", class_weight=None):
    """``loss = sum_p w_p * (-log softmax(z_p)[y_p]) / norm`` over pixels p.

    ``w_p`` is ``class_weight[y_p]`` (1 without weights) and 0 for pixels
    labelled ``ignore_index``. ``norm`` is ``sum_p w_p`` for 'mean' (PyTorch's
    weighted mean; 0 counted pixels give loss 0) and 1 for 'sum'.

    Inputs:
        logits: (N, C, H, W); labels: (N, H, W) integers.
    Returns:
        the loss, a Python float.
    """
    n_, c_, h_, w_ = logits.shape
    weights = _pixel_weights(labels, ignore_index, class_weight)
    total = 0.0
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                if weights[n, h, w] == 0:
                    continue
                log_p = _log_softmax_at(logits, n, h, w)
                total += weights[n, h, w] * -log_p[int(labels[n, h, w])]
    norm = weights.sum() if reduction == "mean" else 1.0
    return total / norm if norm > 0 else 0.0


def softmax_cross_entropy_backward(logits, labels, ignore_index=255, reduction="mean", class_weight=None):
    """Gradient of :func:`softmax_cross_entropy` with respect to the logits:
    ``w_p * (softmax(z_p)[c] - [c == y_p]) / norm``.

    Inputs:
        logits: (N, C, H, W); labels: (N, H, W).
    Returns:
        dlogits: (N, C, H, W).
    """
    n_, c_, h_, w_ = logits.shape
    weights = _pixel_weights(labels, ignore_index, class_weight)
    norm = weights.sum() if reduction == "mean" else 1.0
    grad = np.zeros(logits.shape, dtype=logits.dtype)
    if norm == 0:
        return grad
    for n in range(n_):
        for h in range(h_):
            for w in range(w_):
                if weights[n, h, w] == 0:
                    continue
                log_p = _log_softmax_at(logits, n, h, w)
                for c in range(c_):
                    onehot = 1.0 if c == int(labels[n, h, w]) else 0.0
                    grad[n, c, h, w] = weights[n, h, w] * (math.exp(log_p[c]) - onehot) / norm
    return grad


def sigmoid_bce(logits, targets, ignore_index=255, reduction="mean"):
    """Binary cross-entropy of ``s = sigmoid(z)``: ``-t log s - (1 - t) log(1 - s)``
    per pixel, summed over counted pixels (not ``ignore_index``), divided by
    their number for 'mean'. Written literally: fine for moderate logits
    (|z| < 30), which is what an oracle needs.

    Inputs:
        logits: (N, 1, H, W); targets: (N, H, W) of 0/1 (or ignore_index).
    Returns:
        the loss, a Python float.
    """
    total, count = 0.0, 0
    for idx in np.ndindex(targets.shape):
        t = int(targets[idx])
        if ignore_index is not None and t == ignore_index:
            continue
        s = 1.0 / (1.0 + math.exp(-float(logits[idx[0], 0, idx[1], idx[2]])))
        total += -t * math.log(s) - (1 - t) * math.log(1.0 - s)
        count += 1
    if reduction == "sum":
        return total
    return total / count if count else 0.0


def sigmoid_bce_backward(logits, targets, ignore_index=255, reduction="mean"):
    """Gradient of :func:`sigmoid_bce`: ``(sigmoid(z) - t) / norm`` at counted pixels.

    Inputs:
        logits: (N, 1, H, W); targets: (N, H, W).
    Returns:
        dlogits: (N, 1, H, W).
    """
    grad = np.zeros(logits.shape, dtype=logits.dtype)
    count = 0
    for idx in np.ndindex(targets.shape):
        t = int(targets[idx])
        if ignore_index is not None and t == ignore_index:
            continue
        s = 1.0 / (1.0 + math.exp(-float(logits[idx[0], 0, idx[1], idx[2]])))
        grad[idx[0], 0, idx[1], idx[2]] = s - t
        count += 1
    if reduction == "mean" and count:
        grad /= count
    return grad
