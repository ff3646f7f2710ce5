"""ReLU and Dropout: gradients, the reference, modes, dtypes and errors."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn import reference as ref
from minifcn.backend import to_numpy
from minifcn.gradcheck import check_layer
from minifcn.layers import Dropout, ReLU
from minifcn.layers.activation import hashed_keep_mask, splitmix64

SHAPES = [(1, 1, 3, 4), (2, 3, 5, 4), (3, 5, 2, 7)]
SHAPE_IDS = ["n1-c1-3x4", "n2-c3-5x4", "n3-c5-2x7"]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_relu_gradcheck(shape, mode, xp, rng, tie_free):
    x = xp.asarray(tie_free(shape, rng))  # every value at least 0.1 away from the kink
    report = check_layer(ReLU(), x, mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_relu_matches_reference(shape, xp, rng, rel_err):
    x = rng.standard_normal(shape)
    layer = ReLU()
    y = layer(xp.asarray(x))
    assert rel_err(y, ref.relu(x)) == 0.0
    dy = rng.standard_normal(shape)
    assert rel_err(layer.backward(xp.asarray(dy)), ref.relu_backward(x, dy)) == 0.0


@pytest.mark.parametrize("shape,contiguous", [((4, 2, 5, 3), True), ((1, 5, 4, 3), True), ((5, 3, 4, 2), False)],
                         ids=["n4-cut-along-batch", "n1-cut-along-channels", "strided-input"])
@pytest.mark.parametrize("inplace", [False, True])
def test_relu_cut_into_pieces_per_thread_is_exact(shape, contiguous, inplace, rng, monkeypatch):
    """ReLU on several threads (minifcn.parallel.pieces, forced on tiny arrays) equals the reference."""
    import minifcn.layers.activation as activation
    from minifcn import parallel

    monkeypatch.setattr(parallel, "MIN_PIECE_BYTES", 0)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    counts = []
    monkeypatch.setattr(activation, "run_pieces", lambda idx, work: (counts.append(len(idx)), parallel.run_pieces(idx, work)))
    x = rng.standard_normal(shape)
    if not contiguous:
        x = x.transpose(0, 1, 3, 2)
    x_before = x.copy()
    dy = rng.standard_normal(x.shape)
    layer = ReLU(inplace=inplace)
    y = layer(x)
    np.testing.assert_array_equal(y, ref.relu(x_before))
    np.testing.assert_array_equal(layer.backward(dy), ref.relu_backward(x_before, dy))
    assert (y is x) == inplace
    assert counts == [3, 3]


def test_relu_gradient_at_zero_is_zero_and_inplace():
    x = np.array([[[[-1.0, 0.0, 2.0]]]])
    layer = ReLU()
    np.testing.assert_array_equal(layer(x), [[[[0.0, 0.0, 2.0]]]])
    np.testing.assert_array_equal(layer.backward(np.ones_like(x)), [[[[0.0, 0.0, 1.0]]]])
    assert x[0, 0, 0, 0] == -1.0  # not in place by default
    inplace = ReLU(inplace=True)
    y = inplace(x)
    assert y is x and x[0, 0, 0, 0] == 0.0
    np.testing.assert_array_equal(inplace.backward(np.full_like(x, 3.0)), [[[[0.0, 0.0, 3.0]]]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 300, 301), (7,), ()], ids=["nchw", "wide-plane", "1d", "0d"])
def test_relu_keeps_nan_and_gives_maximums_bits(dtype, shape, rng, monkeypatch):
    """max(x, 0) against a block of zeros (a plane, or a row past ZERO_BLOCK_MOST) is np.maximum(x, 0)
    bit for bit: NaN stays NaN, -0.0 and infinities as they were."""
    import minifcn.layers.activation as activation

    monkeypatch.setattr(activation, "ZERO_BLOCK_MOST", 1000)  # the wide plane takes a row
    x = rng.standard_normal(shape).astype(dtype)
    special = np.array([np.nan, -np.nan, -0.0, 0.0, np.inf, -np.inf], dtype=dtype)
    flat = x.reshape(-1)
    flat[:min(flat.size, special.size)] = special[:flat.size]
    want = np.maximum(x, 0)
    got = ReLU()(x)
    np.testing.assert_array_equal(np.atleast_1d(got).view(np.uint8), np.atleast_1d(want).view(np.uint8))
    assert np.isnan(got.reshape(-1)[0])
    assert activation._zero_block((1, 2, 300, 301)) == (301,) and activation._zero_block((2, 3, 5, 4)) == (5, 4)


def test_relu_errors():
    layer = ReLU()
    with pytest.raises(RuntimeError, match=r"ReLU: backward called before forward"):
        layer.backward(np.zeros(3))
    layer(np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 2, 3\)"):
        layer.backward(np.zeros((1, 2, 3)))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_dropout_gradcheck_train_mode(p, mode, xp, rng):
    layer = Dropout(p, seed=3)
    report = check_layer(layer, xp.asarray(rng.standard_normal((2, 3, 4, 5))), mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_matches_reference_with_its_mask(p, xp, rng, rel_err):
    x = rng.standard_normal((2, 3, 6, 5))
    layer = Dropout(p, seed=11)
    y = layer(xp.asarray(x))
    keep = to_numpy(y) != 0  # x has no zeros, so the kept entries are the nonzero ones
    assert 0 < keep.sum() < keep.size
    assert rel_err(y, ref.dropout(x, keep, p)) < 1e-15
    dy = rng.standard_normal(x.shape)
    assert rel_err(layer.backward(xp.asarray(dy)), ref.dropout_backward(keep, dy, p)) < 1e-15


def test_dropout_statistics_and_seed():
    x = np.ones((4, 8, 32, 32))
    y = Dropout(0.3, seed=0)(x)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.01                      # Bernoulli(1 - p) mask
    np.testing.assert_allclose(y[kept], 1.0 / 0.7)            # inverted: the mean is preserved
    np.testing.assert_array_equal(Dropout(0.3, seed=5)(x), Dropout(0.3, seed=5)(x))
    layer = Dropout(0.3, seed=5)
    assert not np.array_equal(layer(x), layer(x))              # a fresh mask per forward


def test_dropout_eval_mode_and_p_zero_are_identity(rng):
    x = rng.standard_normal((2, 3, 4, 4))
    dy = rng.standard_normal(x.shape)
    layer = Dropout(0.5, seed=0).eval()
    np.testing.assert_array_equal(layer(x), x)
    np.testing.assert_array_equal(layer.backward(dy), dy)
    layer.train()
    assert not np.array_equal(layer(x), x)
    zero = Dropout(0.0)
    np.testing.assert_array_equal(zero(x), x)
    np.testing.assert_array_equal(zero.backward(dy), dy)


def test_float32_stays_float32(xp, rng, rel_err):
    x = rng.standard_normal((2, 3, 4, 5))
    dy = rng.standard_normal(x.shape)
    for make in (lambda: ReLU(), lambda: Dropout(0.4, seed=2)):
        l32, l64 = make(), make()
        y32, y64 = l32(xp.asarray(x.astype(np.float32))), l64(xp.asarray(x))
        dx32, dx64 = l32.backward(xp.asarray(dy.astype(np.float32))), l64.backward(xp.asarray(dy))
        assert y32.dtype == dx32.dtype == np.float32
        assert rel_err(y32, y64) < 1e-4 and rel_err(dx32, dx64) < 1e-4


def test_dropout_errors():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"p must be in \[0, 1\), got {p}"):
            Dropout(p)
    layer = Dropout(0.5)
    with pytest.raises(RuntimeError, match=r"Dropout: backward called before forward"):
        layer.backward(np.zeros((1, 1, 2, 2)))
    layer(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 1, 2, 3\)"):
        layer.backward(np.zeros((1, 1, 2, 3)))


def test_splitmix64_gives_the_published_sequence():
    """The device masks' hash is SplitMix64: its published outputs for seeds 0 and 1234567."""
    assert [int(v) for v in splitmix64(0, 3)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    assert int(splitmix64(1234567, 1)[0]) == 6457827717110365317


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_hashed_masks_keep_one_minus_p_independently(p):
    """The GPU's masks (here their NumPy twin): kept with probability 1 - p, scaled by 1 / (1 - p),
    independent between neighbouring elements and between seeds."""
    threshold = int(np.ceil(p * 2**24))
    size = 200_000
    a = hashed_keep_mask(7, size, threshold, 1 / (1 - p), dtype=np.float32) != 0
    b = hashed_keep_mask(8, size, threshold, 1 / (1 - p), dtype=np.float32) != 0
    sigma = np.sqrt(p * (1 - p) / size)
    assert abs(a.mean() - (1 - p)) < 5 * sigma
    assert abs((a & b).mean() - (1 - p) ** 2) < 5 * sigma         # seeds: independent
    assert abs((a[1:] & a[:-1]).mean() - (1 - p) ** 2) < 5 * sigma  # neighbours: independent
    np.testing.assert_array_equal(a, hashed_keep_mask(7, size, threshold, 2.0) != 0)  # a seed, a mask
    assert set(np.unique(hashed_keep_mask(7, 100, threshold, 1 / (1 - p), dtype=np.float32))) <= {0, np.float32(1 / (1 - p))}


def test_host_masks_option_keeps_the_host_draw(rng):
    """On NumPy both settings draw from the layer's Generator; host_masks=True is the setting that
    does so on the GPU too (the same masks on either device)."""
    x = rng.standard_normal((2, 3, 4, 5))
    np.testing.assert_array_equal(Dropout(0.4, seed=9)(x), Dropout(0.4, seed=9, host_masks=True)(x))
    assert "host_masks=True" in repr(Dropout(0.4, host_masks=True))


def test_device_masks_follow_the_host_generator(xp, rng):
    """The GPU's mask of a forward is drawn from a seed the host Generator gives, so the host state
    (what checkpoints save) replays it exactly; on NumPy the host draws the mask itself."""
    x = xp.asarray(rng.standard_normal((2, 3, 4, 5)))
    layer = Dropout(0.5, seed=4)
    state = layer.rng.bit_generator.state
    first = to_numpy(layer(x))
    assert not np.array_equal(to_numpy(layer(x)), first)
    layer.rng.bit_generator.state = state
    np.testing.assert_array_equal(to_numpy(layer(x)), first)
