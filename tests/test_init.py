"""Initialisers: FCN's bilinear kernel (values, channel-diagonal layout, and
equality with bilinear Upsample away from the borders) and He normal."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn.layers import ConvTranspose2d, Upsample, bilinear_kernel, he_normal, upsample_filt


def test_upsample_filt_k4_by_hand():
    """k = 4: f = ceil(4/2) = 2, centre c = f - 0.5 = 1.5, per-axis weights
    1 - |i - 1.5| / 2 = [0.25, 0.75, 0.75, 0.25]; the 2-D kernel is their outer
    product, so the first row is 0.25 * [0.25, 0.75, 0.75, 0.25]."""
    filt = upsample_filt(4)
    assert filt.shape == (4, 4) and filt.dtype == np.float64
    np.testing.assert_array_equal(filt[0], [0.0625, 0.1875, 0.1875, 0.0625])
    np.testing.assert_array_equal(filt[1], [0.1875, 0.5625, 0.5625, 0.1875])
    np.testing.assert_array_equal(filt, filt.T)


def test_upsample_filt_odd_and_rectangular():
    """k = 3: f = 2, c = f - 1 = 1 (odd: centred on a pixel), weights [0.5, 1, 0.5]."""
    np.testing.assert_array_equal(upsample_filt(3), np.outer([0.5, 1.0, 0.5], [0.5, 1.0, 0.5]))
    np.testing.assert_array_equal(upsample_filt(1), [[1.0]])
    np.testing.assert_array_equal(upsample_filt((2, 3)), np.outer([0.5, 0.5], [0.5, 1.0, 0.5]))


@pytest.mark.parametrize("s", [2, 4, 8])
def test_per_axis_weights_of_a_stride_s_kernel_sum_to_one_per_phase(s):
    """Each output phase of a stride-s transposed convolution with k = 2s is hit by
    two taps, s apart; their weights sum to 1 (a partition of unity)."""
    axis = upsample_filt((1, 2 * s))[0]
    np.testing.assert_allclose(axis[:s] + axis[s:], 1.0, rtol=0, atol=1e-15)


def test_bilinear_kernel_is_channel_diagonal():
    w = bilinear_kernel(3, 3, 4)
    assert w.shape == (3, 3, 4, 4) and w.dtype == np.float32
    for i in range(3):
        for j in range(3):
            want = upsample_filt(4).astype(np.float32) if i == j else np.zeros((4, 4), np.float32)
            np.testing.assert_array_equal(w[i, j], want)
    assert bilinear_kernel(2, 3, 4, dtype=np.float64).dtype == np.float64
    assert np.count_nonzero(bilinear_kernel(2, 3, 4)[:, 2]) == 0  # no input feeds output channel 2


@pytest.mark.parametrize("s", [2, 4, 8])
def test_bilinear_conv_transpose_equals_bilinear_upsample_in_the_interior(s, rng):
    """ConvTranspose2d(C, C, 2s, stride s, padding s/2) with the bilinear kernel
    outputs H*s rows; output o mixes inputs with weights 1 - |src - h| where
    src = (o + 0.5)/s - 0.5, exactly the half-pixel bilinear rule. They differ only
    where Upsample clamps src to the edge: the first and last s/2 rows/columns."""
    c, h, w = 3, 5, 4
    layer = ConvTranspose2d(c, c, 2 * s, stride=s, padding=s // 2, bias=False, dtype=np.float64)
    layer.weight.data[...] = bilinear_kernel(c, c, 2 * s, dtype=np.float64)
    x = rng.standard_normal((2, c, h, w))
    y = layer(x)
    up = Upsample(scale_factor=s, mode="bilinear")(x)
    assert y.shape == up.shape == (2, c, h * s, w * s)
    m = s // 2
    np.testing.assert_allclose(y[:, :, m:-m, m:-m], up[:, :, m:-m, m:-m], rtol=1e-12, atol=1e-12)
    # The borders really differ (the comparison above is not vacuous).
    assert not np.allclose(y[:, :, 0], up[:, :, 0])
    # Channel-diagonal: a constant input 1 in channel 0 only leaves the others at 0.
    x1 = np.zeros((1, c, h, w))
    x1[:, 0] = 1.0
    y1 = layer(x1)
    assert np.abs(y1[:, 1:]).max() == 0.0
    np.testing.assert_allclose(y1[0, 0, m:-m, m:-m], 1.0, rtol=0, atol=1e-12)


def test_he_normal_scale_and_dtype():
    w = he_normal((64, 32, 3, 3), fan_in=32 * 9, rng=0)
    assert w.dtype == np.float32 and w.shape == (64, 32, 3, 3)
    np.testing.assert_allclose(w.std(), np.sqrt(2.0 / (32 * 9)), rtol=0.03)
    assert abs(float(w.mean())) < 0.01
    assert he_normal((10,), 5, rng=1, dtype=np.float64).dtype == np.float64
    np.testing.assert_array_equal(he_normal((4, 4), 8, rng=7), he_normal((4, 4), 8, rng=7))
