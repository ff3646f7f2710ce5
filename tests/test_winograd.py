"""Winograd's F(2x2, 3x3): the identity it rests on, its routes against the textbook ones, its gradients.

The identity is checked on single tiles against the definition of correlation;
the routes on many geometries (odd and even sides, padding 0 to 2, batches, bands
shared by threads, float64 and float32, an ``out_hw`` smaller than the natural
size); the layer that takes them by its default rule against central differences
and against the textbook route; and the forward's kept tiles against their misuse.
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import max_rel_err
from minifcn import route, routes
from minifcn.backend import to_numpy
from minifcn.gradcheck import check_layer
from minifcn.layers import Conv2d, conv_fast, winograd
from minifcn.layers.conv_fast import FORWARD, INPUT_GRAD, WEIGHT_GRAD

GEOMETRY = ((1, 1), (1, 1), (1, 1))  # stride, padding, dilation of the small FCN's 3x3 layers


def test_one_tile_is_the_correlation_of_its_4x4_input_with_the_kernel():
    """At [(G g G^T) * (Bt d B)] A equals y[i, j] = sum_ab d[i + a, j + b] g[a, b] for 2x2 outputs, and the
    Kronecker forms used on flattened tiles say the same."""
    rng = np.random.default_rng(0)
    B, A = winograd.Bt.T, winograd.At.T
    for _ in range(20):
        d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
        want = np.array([[np.sum(d[i:i + 3, j:j + 3] * g) for j in range(2)] for i in range(2)])
        got = winograd.At @ ((winograd.G @ g @ winograd.G.T) * (winograd.Bt @ d @ B)) @ A
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        flat = winograd._OUTPUT @ ((winograd._KERNEL @ g.ravel()) * (winograd._INPUT @ d.ravel()))
        np.testing.assert_allclose(flat.reshape(2, 2), want, rtol=1e-12, atol=1e-12)


CASES = [  # (N, Cin, Cout, H, W, padding)
    (1, 3, 4, 9, 9, 1), (2, 5, 3, 8, 11, 1), (3, 2, 2, 5, 6, 0), (1, 4, 6, 7, 4, 2), (1, 2, 3, 1, 1, 1),
    (2, 3, 3, 16, 15, 1), (1, 3, 2, 3, 3, 0), (4, 6, 5, 13, 2, 1), (5, 2, 7, 6, 10, 2), (1, 1, 1, 2, 5, 1),
]


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 3e-6)])
def test_routes_equal_the_textbook_on_odd_and_even_geometries(dtype, tol, threads, monkeypatch):
    """Forward (with bias) and weight gradient (added into ``accumulate``), bands of one image or tile rows
    on two threads; float32 within a few units in the last place of the largest value."""
    monkeypatch.setenv("MINIFCN_NUM_THREADS", threads)
    monkeypatch.setattr(conv_fast, "WINOGRAD_MIN_BAND_BYTES", 64)  # bands even on these small maps
    rng = np.random.default_rng(1)
    for n, cin, cout, h, w, p in CASES:
        x = rng.standard_normal((n, cin, h, w)).astype(dtype)
        k = rng.standard_normal((cout, cin, 3, 3)).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype)
        geometry = ((1, 1), (p, p), (1, 1))
        want = routes.textbook(FORWARD).fn(x, k, *geometry, None, b)
        got = conv_fast.forward_by_winograd(x, k, *geometry, None, b)
        assert got.dtype == dtype and max_rel_err(got, want) < tol, (n, cin, cout, h, w, p)
        dy = rng.standard_normal(want.shape).astype(dtype)
        acc = rng.standard_normal(k.shape).astype(dtype)
        want = routes.textbook(WEIGHT_GRAD).fn(dy, x, k.shape, *geometry, accumulate=acc.copy())
        got = conv_fast.weight_grad_by_winograd(dy, x, k.shape, *geometry, accumulate=acc.copy())
        assert got.dtype == dtype and max_rel_err(got, want) < tol, (n, cin, cout, h, w, p)


def test_bands_cover_every_tile_once():
    """Images of a batch, or tile rows of one image; their tile columns are consecutive and end at the last."""
    for shape in ((1, 3, 37, 37), (8, 3, 33, 33), (3, 3, 5, 5), (1, 3, 1, 1)):
        tiling = winograd.Tiling(shape, (1, 1), shape[2:])
        for pieces in (1, 2, 3, 7, 50):
            bands = tiling.bands(pieces)
            spans = [tiling.columns(band) for band in bands]
            assert spans[0][0] == 0 and spans[-1][1] == tiling.tiles
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:]))


def test_a_smaller_out_hw_is_the_natural_output_cut():
    """The forward of a transposed convolution's backward asks for fewer rows and columns."""
    rng = np.random.default_rng(2)
    x, k = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((4, 3, 3, 3))
    whole = routes.textbook(FORWARD).fn(x, k, *GEOMETRY)
    got = conv_fast.forward_by_winograd(x, k, *GEOMETRY, (7, 5))
    np.testing.assert_allclose(got, whole[:, :, :7, :5], rtol=1e-12, atol=1e-12)


def _layer_and_batch(rng, dtype, n=4, c=32, side=9):
    layer = Conv2d(c, c, 3, padding=1, dtype=dtype, rng=0)
    return layer, rng.standard_normal((n, c, side, side)).astype(dtype)


def test_the_default_rule_takes_batches_with_enough_channels_on_small_maps():
    def chosen(op, n, cin, cout, side, k=3, stride=1, dilation=1):
        facts = conv_fast.conv_facts((n, cin, side, side), (cout, cin, k, k), (stride, stride), (1, 1),
                                     (dilation, dilation))
        return routes.select(op, *facts).name

    least, channels = conv_fast.WINOGRAD_LEAST_BATCH, conv_fast.WINOGRAD_LEAST_CHANNELS
    with route("fast"):
        for op in (FORWARD, WEIGHT_GRAD):
            assert chosen(op, least, channels, 2 * channels, 33) == "winograd"
            assert chosen(op, least - 1, channels, channels, 33) != "winograd"        # the recipe's batch 1
            assert chosen(op, least, channels - 1, channels, 33) != "winograd"
            assert chosen(op, least, channels, channels - 1, 33) != "winograd"
            assert chosen(op, least, channels, channels, 49) != "winograd"            # past 48 x 48 outputs
            assert chosen(op, least, channels, channels, 33, k=5) != "winograd"
            assert chosen(op, least, channels, channels, 33, stride=2) != "winograd"
            assert chosen(op, least, channels, channels, 33, dilation=2) != "winograd"
    with route("textbook"):
        assert chosen(FORWARD, least, channels, channels, 33) == "textbook"


def test_a_layer_on_the_route_passes_the_gradient_check():
    """Central differences in float64 on the route the default rule picks, forward, input gradient (the
    flipped kernel's convolution, on this route too) and weight gradient."""
    rng = np.random.default_rng(3)
    layer, x = _layer_and_batch(rng, np.float64)
    with route("fast"):
        facts = layer.route_facts(x.shape)
        assert routes.select(FORWARD, *facts["forward"][1]).name == "winograd"
        assert routes.select(WEIGHT_GRAD, *facts["weight grad"][1]).name == "winograd"
        report = check_layer(layer, x, mode="random")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


def test_a_training_layer_keeps_its_tiles_for_the_weight_gradient(xp):
    """Training: the forward's V serves the weight gradient of that same x (no second transform, the same
    numbers as without it); another x of the same shape gets its own; eval mode keeps nothing."""
    rng = np.random.default_rng(4)
    layer, x = _layer_and_batch(rng, np.float64)
    dy = rng.standard_normal(layer.output_shape(x.shape))
    if xp is not np:
        layer.to("gpu")
    x, dy = xp.asarray(x), xp.asarray(dy)
    with route("fast"):
        layer(x)
        memo = layer._cache[2]
        assert conv_fast._WINO_KEPT in memo
        kept_grad = conv_fast.weight_grad_by_winograd(dy, x, layer.weight.shape, *GEOMETRY, memo=memo)
        assert conv_fast._WINO_KEPT not in memo                           # taken once
        fresh_grad = conv_fast.weight_grad_by_winograd(dy, x, layer.weight.shape, *GEOMETRY)
        assert max_rel_err(kept_grad, fresh_grad) < 1e-14
        layer(x)
        other = xp.asarray(rng.standard_normal(x.shape))
        got = conv_fast.weight_grad_by_winograd(dy, other, layer.weight.shape, *GEOMETRY, memo=layer._cache[2])
        want = routes.textbook(WEIGHT_GRAD).fn(dy, other, layer.weight.shape, *GEOMETRY)
        assert max_rel_err(got, want) < 1e-12
        layer.eval()
        layer(x)
        assert conv_fast._WINO_KEPT not in layer._cache[2]


def test_tiles_past_the_keep_budget_are_recomputed(monkeypatch):
    """V larger than WINOGRAD_KEEP_BYTES is not kept: the weight gradient transforms x again, to the same numbers."""
    rng = np.random.default_rng(6)
    layer, x = _layer_and_batch(rng, np.float64)
    dy = rng.standard_normal(layer.output_shape(x.shape))
    tiles = 16 * x.shape[1] * winograd.Tiling(x.shape, (1, 1), x.shape[2:]).tiles
    monkeypatch.setattr(conv_fast, "WINOGRAD_KEEP_BYTES", tiles * 8 - 8)  # one value too few
    with route("fast"):
        layer.zero_grad()
        layer(x)
        assert conv_fast._WINO_KEPT not in layer._cache[2] and not layer._across_calls
        layer.backward(dy)
    want = routes.textbook(WEIGHT_GRAD).fn(dy, x, layer.weight.shape, *GEOMETRY)
    assert max_rel_err(layer.weight.grad, want) < 1e-12
    monkeypatch.setattr(conv_fast, "WINOGRAD_KEEP_BYTES", tiles * 8)
    with route("fast"):
        layer(x)
    assert conv_fast._WINO_KEPT in layer._cache[2]


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_a_layer_on_the_route_equals_the_textbook_route(dtype, tol):
    """A whole training pass of the layer (forward, backward: dx, dW, db) by the fast routes and the textbook."""
    rng = np.random.default_rng(5)
    layer, x = _layer_and_batch(rng, dtype, n=5, c=33, side=12)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(dtype)
    results = {}
    for mode in ("fast", "textbook"):
        layer.zero_grad()
        with route(mode):
            y = layer(x)
            dx = layer.backward(dy)
        results[mode] = [to_numpy(a).copy() for a in (y, dx, layer.weight.grad, layer.bias.grad)]
    for got, want in zip(*results.values()):
        assert got.dtype == dtype and max_rel_err(got, want) < tol
    with route("fast"):
        facts = layer.route_facts(x.shape)
        assert routes.select(INPUT_GRAD, *facts["input grad"][1]).name == "flipped-kernel"
