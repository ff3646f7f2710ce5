"""im2col / col2im: the unfolding matches a direct patch copy, col2im is its
adjoint (it adds, it does not overwrite), and the size helpers."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn.backend import to_numpy
from minifcn.layers import col2im, conv_output_size, im2col

GEOMETRIES = [  # (kernel, stride, padding, dilation, input shape)
    ((1, 1), (1, 1), (0, 0), (1, 1), (2, 3, 4, 5)),
    ((1, 1), (2, 1), (1, 0), (1, 1), (1, 2, 5, 4)),
    ((3, 3), (1, 1), (1, 1), (1, 1), (2, 2, 5, 6)),
    ((3, 2), (2, 1), (1, 0), (2, 1), (1, 3, 7, 5)),
    ((2, 4), (3, 2), (0, 2), (1, 2), (2, 1, 8, 6)),
    ((5, 5), (4, 4), (3, 3), (3, 3), (1, 2, 9, 10)),
    ((7, 1), (1, 3), (3, 0), (1, 1), (1, 1, 4, 7)),
    # the stride divides the kernel: offsets are taken s x s at a time
    ((4, 4), (2, 2), (1, 1), (1, 1), (2, 3, 5, 6)),
    ((6, 4), (3, 2), (0, 1), (1, 1), (1, 2, 8, 7)),
    ((16, 16), (8, 8), (0, 0), (1, 1), (1, 2, 17, 20)),
    ((4, 2), (2, 2), (2, 0), (1, 1), (3, 1, 7, 9)),
]
IDS = [f"k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-p{p[0]}x{p[1]}-d{d[0]}x{d[1]}-n{x[0]}-c{x[1]}-{x[2]}x{x[3]}"
       for k, s, p, d, x in GEOMETRIES]


def direct_im2col(x, kernel, stride, padding, dilation):
    """cols[n, c*kh*kw + i*kw + j, p*OW + q] = xpad[n, c, p*sh + i*dh, q*sw + j*dw], by loops."""
    n_, c_, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    oh, ow = (conv_output_size(h, kh, sh, ph, dh), conv_output_size(w, kw, sw, pw, dw))
    xpad = np.zeros((n_, c_, h + 2 * ph, w + 2 * pw))
    xpad[:, :, ph:ph + h, pw:pw + w] = x
    cols = np.zeros((n_, c_ * kh * kw, oh * ow))
    for n in range(n_):
        for c in range(c_):
            for i in range(kh):
                for j in range(kw):
                    for p in range(oh):
                        for q in range(ow):
                            cols[n, c * kh * kw + i * kw + j, p * ow + q] = xpad[n, c, p * sh + i * dh, q * sw + j * dw]
    return cols, (oh, ow)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_im2col_matches_direct_copy(geometry, xp, rng):
    kernel, stride, padding, dilation, shape = geometry
    x = rng.standard_normal(shape)
    cols, out_hw = im2col(xp.asarray(x), kernel, stride, padding, dilation)
    want, want_hw = direct_im2col(x, kernel, stride, padding, dilation)
    assert out_hw == want_hw
    np.testing.assert_array_equal(to_numpy(cols), want)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=IDS)
def test_col2im_is_the_adjoint_of_im2col(geometry, xp, rng):
    """<im2col(x), c> = <x, col2im(c)> for random x and c."""
    kernel, stride, padding, dilation, shape = geometry
    x = xp.asarray(rng.standard_normal(shape))
    cols, out_hw = im2col(x, kernel, stride, padding, dilation)
    c = xp.asarray(rng.standard_normal(cols.shape))
    back = col2im(c, shape, kernel, stride, padding, dilation, out_hw)
    assert back.shape == shape
    lhs, rhs = float((cols * c).sum()), float((x * back).sum())
    assert abs(lhs - rhs) <= 1e-10 * float(abs(cols * c).sum())


def test_col2im_adds_overlapping_windows():
    """One row of 4 pixels, windows of 2 at stride 1: windows (0,1), (1,2), (2,3).
    Columns of ones scatter back to [1, 2, 2, 1]: each pixel counts its windows."""
    cols = np.ones((1, 2, 3))
    back = col2im(cols, (1, 1, 1, 4), (1, 2), (1, 1), (0, 0), (1, 1), (1, 3))
    np.testing.assert_array_equal(back, [[[[1.0, 2.0, 2.0, 1.0]]]])
    # With padding 1 there are 5 windows over 4 + 2 columns; what lands on the padding is dropped.
    back = col2im(np.ones((1, 2, 5)), (1, 1, 1, 4), (1, 2), (1, 1), (0, 1), (1, 1), (1, 5))
    np.testing.assert_array_equal(back, [[[[2.0, 2.0, 2.0, 2.0]]]])


def test_out_hw_smaller_than_natural_keeps_the_first_positions(rng):
    x = rng.standard_normal((1, 2, 7, 6))
    full, (oh, ow) = im2col(x, (3, 2), (2, 2), (1, 1), (1, 1))
    part, hw = im2col(x, (3, 2), (2, 2), (1, 1), (1, 1), out_hw=(oh - 1, ow - 1))
    assert hw == (oh - 1, ow - 1)
    np.testing.assert_array_equal(part.reshape(1, -1, oh - 1, ow - 1),
                                  full.reshape(1, -1, oh, ow)[:, :, :oh - 1, :ow - 1])


def test_one_by_one_fast_path_is_a_reshape(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    cols, hw = im2col(x, (1, 1), (1, 1), (0, 0), (1, 1))
    assert hw == (4, 5) and cols.dtype == np.float32
    np.testing.assert_array_equal(cols, x.reshape(2, 3, 20))
    np.testing.assert_array_equal(col2im(cols, x.shape, (1, 1), (1, 1), (0, 0), (1, 1), (4, 5)), x)
    assert np.shares_memory(cols, x)  # the columns are the image itself: no copy at all


def test_dtype_is_preserved(rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    cols, hw = im2col(x, (3, 3), (2, 2), (1, 1), (1, 1))
    assert cols.dtype == np.float32
    assert col2im(cols, x.shape, (3, 3), (2, 2), (1, 1), (1, 1), hw).dtype == np.float32


def test_workspaces_belong_to_their_thread_and_release_frees_all():
    """Two threads asking for the same scratch buffer get different arrays; the same thread gets
    its own back; release_workspaces empties every thread's buffers."""
    import threading

    from minifcn.layers import columns

    mine = columns.workspace(np, np.float64, (4, 5))
    assert columns.workspace(np, np.float64, (2, 3)).base is mine.base  # reused, not reallocated
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(columns.workspace(np, np.float64, (4, 5))))
    thread.start()
    thread.join()
    assert not np.shares_memory(theirs[0], mine)
    columns.release_workspaces()
    assert all(not buffers.arrays for buffers in columns._every_thread)
    assert not np.shares_memory(columns.workspace(np, np.float64, (4, 5)), mine)
