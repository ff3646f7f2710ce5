"""MaxPool2d: gradients, the reference oracle (tie rule, -inf padding, ceil
mode), output sizes, dtypes and errors.

A configuration is its test id: ``k3x2-s2-p1-d2-n2-c3-7x6-ceil`` is kernel
3x2, stride 2, padding 1, dilation 2, batch 2, 3 channels, a 7x6 input, ceil
mode. Inputs are tie-free (distinct values 2e-3 apart), so every window has a
clear maximum and finite differences see a differentiable function.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from minifcn import reference as ref
from minifcn.gradcheck import check_layer
from minifcn.layers import MaxPool2d, pool_output_size

POOL_CASES = [
    "k2-s2-p0-d1-n1-c1-4x4",
    "k2-s2-p0-d1-n2-c3-5x7-ceil",
    "k2-s2-p1-d1-n1-c2-5x6",
    "k2-s2-p1-d1-n1-c2-5x6-ceil",
    "k3-s1-p1-d1-n2-c2-5x4",
    "k3-s2-p1-d1-n1-c3-7x6-ceil",
    "k3-s2-p0-d1-n1-c1-8x7-ceil",
    "k3x2-s2-p1-d2-n2-c3-7x6",
    "k3x2-s2x1-p1x0-d1-n1-c2-6x5-ceil",
    "k4-s3-p2-d1-n1-c2-9x8-ceil",
    "k4-s4-p0-d1-n2-c1-9x10-ceil",
    "k5-s2-p2-d1-n1-c2-7x8",
    "k5-s3-p1-d1-n1-c1-10x9-ceil",
    "k2-s1-p0-d3-n1-c2-6x5",
    "k3-s2-p1-d3-n1-c1-9x8-ceil",
    "k7-s3-p3-d1-n1-c1-9x9-ceil",
    "k6x3-s4x2-p3x1-d1-n1-c2-9x7-ceil",
    "k1-s2-p0-d1-n1-c2-5x6",
    "k1-s2-p0-d1-n1-c2-5x6-ceil",
    "k3-s3-p1-d1-n3-c2-8x8-ceil",
    "k2-s3-p1-d2-n1-c1-8x7-ceil",
    "k5x1-s1x3-p2x0-d1-n1-c2-6x10-ceil",
    "k2-s2-p0-d1-n1-c5-1x2-ceil",
    "k3-s4-p1-d2-n2-c1-10x11",
]
ELEMENTWISE_POOL = ["k2-s2-p1-d1-n1-c2-5x6-ceil", "k3x2-s2-p1-d2-n2-c3-7x6", "k6x3-s4x2-p3x1-d1-n1-c2-9x7-ceil"]

_TOKEN = re.compile(r"^(k|s|p|d)(\d+)(?:x(\d+))?$")


def parse(case: str) -> dict:
    """``"k3x2-s2-p1-d2-n2-c3-7x6-ceil"`` -> keyword arguments and the input shape."""
    cfg = {"stride": None, "padding": (0, 0), "dilation": (1, 1), "ceil_mode": False}
    names = {"k": "kernel_size", "s": "stride", "p": "padding", "d": "dilation"}
    dims = {}
    for tok in case.split("-"):
        if tok == "ceil":
            cfg["ceil_mode"] = True
        elif m := _TOKEN.match(tok):
            a = int(m.group(2))
            cfg[names[m.group(1)]] = (a, int(m.group(3)) if m.group(3) else a)
        elif m := re.match(r"^([nc])(\d+)$", tok):
            dims[m.group(1)] = int(m.group(2))
        elif m := re.match(r"^(\d+)x(\d+)$", tok):
            dims["hw"] = (int(m.group(1)), int(m.group(2)))
        else:
            raise ValueError(f"bad token {tok!r} in {case!r}")
    return cfg, (dims["n"], dims["c"], *dims["hw"])


def make(case):
    cfg, shape = parse(case)
    return MaxPool2d(**cfg), cfg, shape


def test_sweep_covers_the_ranges():
    cfgs = [parse(c)[0] for c in POOL_CASES]
    assert len(POOL_CASES) >= 20 and len(set(POOL_CASES)) == len(POOL_CASES)
    assert {k for c in cfgs for k in c["kernel_size"]} >= set(range(1, 8))
    assert {s for c in cfgs for s in c["stride"]} >= {1, 2, 3, 4}
    assert {p for c in cfgs for p in c["padding"]} >= {0, 1, 2, 3}
    assert {d for c in cfgs for d in c["dilation"]} >= {1, 2, 3}
    assert {c["ceil_mode"] for c in cfgs} == {True, False}
    # At least one case where ceil mode's extra window is dropped by PyTorch's rule.
    def dropped(cfg, shape):
        return any(ref.pool_output_size(size, k, s, p, d, True) < -(-(size + 2 * p - d * (k - 1) - 1) // s) + 1
                   for size, k, s, p, d in zip(shape[2:], cfg["kernel_size"], cfg["stride"], cfg["padding"],
                                               cfg["dilation"]))
    assert any(dropped(*parse(c)) for c in POOL_CASES if "ceil" in c)


def refkw(cfg):
    """The layer's keyword arguments under the reference's names."""
    out = dict(cfg)
    out["kernel"] = out.pop("kernel_size")
    return out


@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool_gradcheck_random(case, xp, rng, tie_free):
    layer, cfg, shape = make(case)
    x = tie_free(shape, rng)
    assert np.isfinite(ref.max_pool2d(x, **refkw(cfg))).all(), "every window must see at least one input pixel"
    report = check_layer(layer, xp.asarray(x), mode="random")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", ELEMENTWISE_POOL)
def test_maxpool_gradcheck_elementwise(case, rng, tie_free):
    layer, _, shape = make(case)
    report = check_layer(layer, tie_free(shape, rng), mode="elementwise")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", POOL_CASES)
def test_maxpool_matches_reference(case, xp, rng, tie_free, rel_err):
    layer, cfg, shape = make(case)
    x = tie_free(shape, rng)
    y = layer(xp.asarray(x))
    expected = ref.max_pool2d(x, **refkw(cfg))
    assert y.shape == expected.shape == layer.output_shape(shape)
    assert rel_err(y, expected) == 0.0  # max pooling copies values: exact
    dy = rng.standard_normal(y.shape)
    # Overlapping windows add several dy into one pixel: exact up to summation order.
    assert rel_err(layer.backward(xp.asarray(dy)), ref.max_pool2d_backward(x, dy, **refkw(cfg))) < 1e-12


@pytest.mark.parametrize("case", ["k2-s2-p0-d1-n2-c3-5x7-ceil", "k3-s1-p1-d1-n2-c2-5x4", "k3x2-s2-p1-d2-n2-c3-7x6"])
def test_maxpool_reference_with_many_ties(case, xp, rng):
    """Values from {0, 1, 2}: many windows tie; both pick the first maximum."""
    layer, cfg, shape = make(case)
    x = rng.integers(0, 3, size=shape).astype(np.float64)
    y = layer(xp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y.get() if hasattr(y, "get") else y), ref.max_pool2d(x, **refkw(cfg)))
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(xp.asarray(dy))
    dx = dx.get() if hasattr(dx, "get") else dx
    np.testing.assert_allclose(dx, ref.max_pool2d_backward(x, dy, **refkw(cfg)), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", ["k2-s2-p0-d1-n4-c2-6x8-ceil", "k2-s2-p0-d1-n1-c5-7x5-ceil", "k3-s2-p1-d1-n3-c2-7x6",
                                  "k2-s2-p1-d1-n3-c1-5x6"])
def test_maxpool_cut_into_pieces_per_thread_matches_reference(case, rng, monkeypatch):
    """Pooling on several threads (minifcn.parallel.pieces, forced on tiny arrays: along the
    batch, or the channels when N = 1), ties included, equals the reference."""
    import minifcn.layers.pool as pool_module
    from minifcn import parallel

    monkeypatch.setattr(parallel, "MIN_PIECE_BYTES", 0)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")  # pieces are the fast route's (also in a textbook CI run)
    counts = []
    monkeypatch.setattr(pool_module, "run_pieces",
                        lambda idx, work: (counts.append(len(idx)), parallel.run_pieces(idx, work)))
    layer, cfg, shape = make(case)
    x = np.round(rng.standard_normal(shape) * 2) / 2  # many ties
    y = layer(x)
    dy = rng.standard_normal(y.shape)
    np.testing.assert_array_equal(y, ref.max_pool2d(x, **refkw(cfg)))
    np.testing.assert_allclose(layer.backward(dy), ref.max_pool2d_backward(x, dy, **refkw(cfg)), rtol=1e-12, atol=1e-12)
    assert counts == [3, 3]


def test_tie_rule_first_maximum_in_row_major_order():
    """Window [[1, 3], [3, 2]]: the maximum 3 appears at (0, 1) and (1, 0); the
    first in row-major order, (0, 1), gets the whole gradient."""
    x = np.array([[[[1.0, 3.0], [3.0, 2.0]]]])
    pool = MaxPool2d(2)
    np.testing.assert_array_equal(pool(x), [[[[3.0]]]])
    np.testing.assert_array_equal(pool.backward(np.array([[[[5.0]]]])), [[[[0.0, 5.0], [0.0, 0.0]]]])
    # All equal: the top-left element wins.
    pool(np.full((1, 1, 2, 2), 7.0))
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 1, 1))), [[[[1.0, 0.0], [0.0, 0.0]]]])


def test_padding_is_minus_infinity():
    """x = -[[1, 2], [3, 4]], 3x3 windows, stride 1, padding 1: every window covers
    all four pixels and the padding, so every output is max(-1, -2, -3, -4) = -1
    (a zero padding would give 0 everywhere)."""
    x = -np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    pool = MaxPool2d(3, stride=1, padding=1)
    np.testing.assert_array_equal(pool(x), np.full((1, 1, 2, 2), -1.0))
    np.testing.assert_array_equal(pool.backward(np.ones((1, 1, 2, 2))), [[[[4.0, 0.0], [0.0, 0.0]]]])


def test_ceil_mode_worked_examples():
    """FCN's pool: MaxPool2d(2, 2, ceil_mode=True) on 5 columns gives 3, the last
    window holding only column 4: [[1, 5, 2, 8, 3]] -> [[5, 8, 3]]. With padding 1
    a 5-wide input would get a 4th window starting at padded column 6 = the right
    padding: PyTorch drops it, so the output stays 3 wide."""
    x = np.array([[[[1.0, 5.0, 2.0, 8.0, 3.0]]]])
    pool = MaxPool2d((1, 2), ceil_mode=True)
    np.testing.assert_array_equal(pool(x), [[[[5.0, 8.0, 3.0]]]])
    np.testing.assert_array_equal(pool.backward(np.array([[[[1.0, 2.0, 3.0]]]])), [[[[0, 1, 0, 2, 3]]]])
    assert MaxPool2d((1, 2), padding=(0, 1), ceil_mode=True)(x).shape == (1, 1, 1, 3)
    assert pool_output_size(5, 2, 2, 1, 1, True) == 3        # ceil((5 + 2 - 2) / 2) + 1 = 4, dropped to 3
    assert pool_output_size(5, 2, 2, 0, 1, True) == 3        # ceil(3 / 2) + 1
    assert pool_output_size(5, 2, 2, 0, 1, False) == 2       # floor(3 / 2) + 1
    assert pool_output_size(4, 2, 2, 0, 1, True) == 2        # exact fit: no extra window
    assert pool_output_size(6, 3, 2, 0, 1, True) == 3        # ceil(3 / 2) + 1
    assert pool_output_size(500, 2, 2, 0, 1, True) == 250 and pool_output_size(125, 2, 2, 0, 1, True) == 63


def _count_windows(size, k, s, p, d, ceil_mode):
    """Brute force: starts t = 0, s, 2s, ... (padded coordinates) of windows that
    fit in the padded input, or in ceil mode start at or before the last
    element the floor rule would leave uncovered and inside input or left padding."""
    count, t = 0, 0
    last = size + 2 * p - 1
    while True:
        fits = t + d * (k - 1) <= last
        ok = fits or (ceil_mode and t <= last - d * (k - 1) + s - 1 and t < size + p)
        if not ok:
            return count
        count, t = count + 1, t + s


def test_pool_output_size_many_sizes():
    checked = 0
    for size in range(1, 14):
        for k in range(1, 8):
            for s in range(1, 5):
                for p in range(k // 2 + 1):
                    for d in range(1, 4):
                        if size + 2 * p < d * (k - 1) + 1:
                            continue
                        for ceil_mode in (False, True):
                            want = _count_windows(size, k, s, p, d, ceil_mode)
                            assert pool_output_size(size, k, s, p, d, ceil_mode) == want, (size, k, s, p, d, ceil_mode)
                            assert ref.pool_output_size(size, k, s, p, d, ceil_mode) == want
                            checked += 1
    assert checked > 2000


def test_layer_output_shape_many_sizes():
    for h in range(3, 12):
        for w in (3, 8):
            for kw in [dict(kernel_size=2, ceil_mode=True), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                       dict(kernel_size=(3, 2), stride=(1, 2)), dict(kernel_size=2, stride=1, dilation=2)]:
                pool = MaxPool2d(**kw)
                x = np.zeros((1, 2, h, w))
                assert pool(x).shape == pool.output_shape(x.shape) == ref.max_pool2d(x, **refkw(kw)).shape


@pytest.mark.parametrize("case", ["k2-s2-p0-d1-n2-c3-5x7-ceil", "k3x2-s2-p1-d2-n2-c3-7x6", "k4-s3-p2-d1-n1-c2-9x8-ceil"])
def test_float32_matches_float64_and_stays_float32(case, xp, rng, tie_free, rel_err):
    layer, _, shape = make(case)
    x = tie_free(shape, rng)
    y32 = layer(xp.asarray(x.astype(np.float32)))
    assert y32.dtype == np.float32
    dy = rng.standard_normal(y32.shape)
    dx32 = layer.backward(xp.asarray(dy.astype(np.float32)))
    assert dx32.dtype == np.float32
    y64 = layer(xp.asarray(x))
    dx64 = layer.backward(xp.asarray(dy))
    assert rel_err(y32, y64) < 1e-4 and rel_err(dx32, dx64) < 1e-4


def test_errors():
    with pytest.raises(ValueError, match=r"padding=\(2, 2\) must be at most half of kernel_size=\(3, 3\)"):
        MaxPool2d(3, padding=2)
    with pytest.raises(ValueError, match=r"kernel_size must be >= 1, got 0"):
        MaxPool2d(0)
    pool = MaxPool2d(2)
    with pytest.raises(ValueError, match=r"ndim=3"):
        pool(np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match=r"input \(1, 1, 1, 4\) is smaller than the kernel \(2, 2\)"):
        pool(np.zeros((1, 1, 1, 4)))
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        pool.backward(np.zeros((1, 1, 2, 2)))
    pool(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 1, 3, 2\)"):
        pool.backward(np.zeros((1, 1, 3, 2)))


@pytest.mark.torch
def test_output_sizes_match_torch():
    torch = pytest.importorskip("torch")
    for size in range(2, 12):
        for k, s, p, d in [(2, 2, 0, 1), (2, 2, 1, 1), (3, 2, 1, 1), (3, 3, 1, 1), (4, 3, 2, 1), (3, 2, 1, 2), (2, 3, 1, 2)]:
            if size + 2 * p < d * (k - 1) + 1:
                continue
            for ceil_mode in (False, True):
                t = torch.nn.functional.max_pool2d(torch.zeros(1, 1, size, size), k, s, p, d, ceil_mode)
                assert pool_output_size(size, k, s, p, d, ceil_mode) == t.shape[-1], (size, k, s, p, d, ceil_mode)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["k2-s2-p0-d1-n2-c3-5x7-ceil", "k3-s2-p1-d1-n1-c3-7x6-ceil", "k3x2-s2-p1-d2-n2-c3-7x6",
                                  "k2-s2-p1-d1-n1-c2-5x6-ceil"])
def test_maxpool_matches_torch(case, rng, tie_free, rel_err):
    torch = pytest.importorskip("torch")
    layer, cfg, shape = make(case)
    x = tie_free(shape, rng)
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.nn.functional.max_pool2d(tx, cfg["kernel_size"], cfg["stride"], cfg["padding"], cfg["dilation"],
                                        cfg["ceil_mode"])
    y = layer(x)
    assert rel_err(y, ty.detach().numpy()) == 0.0
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert rel_err(layer.backward(dy), tx.grad.numpy()) < 1e-12


def test_pieces_route_equals_the_textbook_route_on_random_geometries(monkeypatch):
    """MaxPool2d forward and backward by the fast route (pieces on 3 threads, forced on tiny
    arrays; written instead of added where windows do not overlap; no zero fill where they
    tile) and by the textbook route, ties included: identical results."""
    from minifcn import parallel, route

    monkeypatch.setattr(parallel, "MIN_PIECE_BYTES", 0)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    rng = np.random.default_rng(31)
    for case in range(60):
        k = tuple(int(v) for v in rng.integers(1, 4, 2))
        s = tuple(int(v) for v in rng.integers(1, 4, 2))
        p = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k)
        layer = MaxPool2d(k, s, p, ceil_mode=bool(rng.integers(0, 2)))
        x = np.round(rng.standard_normal((int(rng.integers(1, 4)), 2, *rng.integers(3, 9, 2))) * 2) / 2
        out = {}
        for mode in ("fast", "textbook"):
            with route(mode):
                y = layer(x)
                out[mode] = (y, layer.backward(np.arange(y.size, dtype=np.float64).reshape(y.shape)))
        for a, b in zip(out["fast"], out["textbook"]):
            np.testing.assert_array_equal(a, b, err_msg=f"case {case}: {layer!r} on {x.shape}")
