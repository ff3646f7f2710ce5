"""im2col / col2im: the shared machinery of convolution and transposed convolution.

``im2col`` unfolds every receptive field of a padded input into a column, so a
convolution becomes one matrix product. ``col2im`` is its *adjoint*, not its
inverse: it adds (``+=``) every column entry back to the input pixel it came
from, so pixels covered by several windows receive the sum of their
contributions. Both loop over the ``kh * kw`` kernel offsets only; each step
moves a whole strided slice of every image, channel and output position.
"""
from __future__ import annotations

from ..backend import get_array_module


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """Output length of a convolution: ``floor((size + 2p - d(k-1) - 1) / s) + 1``."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_transpose_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                               output_padding: int = 0, dilation: int = 1) -> int:
    """Output length of a transposed convolution: ``(size-1)s - 2p + d(k-1) + output_padding + 1``."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _offset_slices(i, j, kernel, stride, dilation, out_hw):
    """Index of the padded input read by kernel offset (i, j) for every output position."""
    (sh, sw), (dh, dw), (oh, ow) = stride, dilation, out_hw
    r0, c0 = i * dh, j * dw
    return (slice(None), slice(None),
            slice(r0, r0 + sh * (oh - 1) + 1, sh),
            slice(c0, c0 + sw * (ow - 1) + 1, sw))


def im2col(x, kernel, stride, padding, dilation, out_hw=None):
    """Unfold receptive fields into columns.

    Inputs:
        x: (N, C, H, W).
        kernel, stride, padding, dilation: (h, w) pairs.
        out_hw: optional (OH, OW) no larger than the natural output size; only
            those output positions are unfolded (used by transposed convolution
            when ``output_padding`` adds rows no input pixel reaches).
    Returns:
        cols: (N, C * kh * kw, OH * OW), row index ``c * kh * kw + i * kw + j``,
            the same order as a PyTorch weight ``(out, C, kh, kw)`` flattened.
        (OH, OW).
    """
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = kernel, padding
    natural = (conv_output_size(h, kh, stride[0], ph, dilation[0]),
               conv_output_size(w, kw, stride[1], pw, dilation[1]))
    oh, ow = natural if out_hw is None else out_hw
    if kh == kw == 1 and stride == (1, 1) and padding == (0, 0) and (oh, ow) == (h, w):
        return x.reshape(n, c, h * w), (oh, ow)  # a 1x1 convolution needs no unfolding
    if ph or pw:
        xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=x.dtype)
        xpad[:, :, ph:ph + h, pw:pw + w] = x
    else:
        xpad = x
    cols = xp.empty((n, c, kh, kw, oh, ow), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xpad[_offset_slices(i, j, kernel, stride, dilation, (oh, ow))]
    return cols.reshape(n, c * kh * kw, oh * ow), (oh, ow)


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
    xp = get_array_module(cols)
    n, c, h, w = x_shape
    (kh, kw), (ph, pw) = kernel, padding
    oh, ow = out_hw
    if kh == kw == 1 and stride == (1, 1) and padding == (0, 0) and (oh, ow) == (h, w):
        return cols.reshape(n, c, h, w)
    cols = cols.reshape(n, c, kh, kw, oh, ow)
    xpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            # += not =: windows overlap, and each pixel collects all its uses.
            xpad[_offset_slices(i, j, kernel, stride, dilation, (oh, ow))] += cols[:, :, i, j]
    return xpad[:, :, ph:ph + h, pw:pw + w]
