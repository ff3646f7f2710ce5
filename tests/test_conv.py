"""Conv2d and ConvTranspose2d: gradients, the reference oracle, the adjoint
relation between the two, hand-worked examples, sizes, dtypes and errors.

Every configuration is written as its test id, for example
``k3x2-s2-p1-d2-op1-n2-c3to4-7x6``: kernel 3x2, stride 2, padding 1,
dilation 2, output_padding 1, batch 2, 3 -> 4 channels, a 7x6 input;
``-nobias`` drops the bias. :func:`parse` turns the id into arguments, so the
id is the configuration and cannot drift from it.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from minifcn import parallel
from minifcn import reference as ref
from minifcn.backend import to_numpy
from minifcn.gradcheck import check_layer
from minifcn.layers import Conv2d, ConvTranspose2d, columns, conv_fast, conv_output_size, conv_transpose_output_size

# ---------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------
CONV_CASES = [
    "k1-s1-p0-d1-n1-c1to1-5x4",
    "k1-s2-p0-d1-n2-c3to2-6x5",
    "k1-s1-p1-d1-n1-c2to3-3x4",
    "k2-s1-p0-d1-n1-c1to2-4x5",
    "k2-s2-p0-d1-n2-c2to2-6x7",
    "k2x3-s2x1-p1x0-d1-n1-c3to1-5x6",
    "k3-s1-p1-d1-n2-c3to4-7x6",
    "k3-s1-p0-d1-n1-c1to1-3x3",
    "k3-s2-p1-d1-n3-c2to3-8x7",
    "k3-s3-p0-d1-n1-c4to2-9x8",
    "k3x2-s2-p1-d2-n2-c3to4-7x6",
    "k3-s1-p2-d2-n1-c2to2-5x6",
    "k3-s1-p3-d3-n1-c1to3-4x5",
    "k3-s4-p1-d1-n2-c5to2-9x10",
    "k4-s2-p1-d1-n1-c2to3-8x6",
    "k4-s4-p0-d1-n1-c1to1-8x9",
    "k4x2-s3x2-p2x1-d1x2-n2-c3to2-7x8",
    "k5-s1-p2-d1-n1-c3to2-6x5",
    "k5-s2-p0-d1-n2-c1to4-7x9",
    "k5x3-s1-p2x1-d1-n1-c2to5-5x4",
    "k5-s3-p3-d2-n1-c2to2-6x7",
    "k6-s2-p3-d1-n1-c1to2-5x6",
    "k6x1-s1-p0-d1-n2-c2to2-6x3",
    "k7-s1-p3-d1-n1-c1to2-5x6",
    "k7-s2-p3-d1-n1-c3to1-8x7",
    "k7x5-s4-p2-d1-n2-c2to3-9x8",
    "k7-s1-p0-d1-n1-c1to1-7x8",
    "k2-s1-p0-d3-n1-c2to2-5x4",
    "k3-s2-p0-d3-n2-c1to1-9x8",
    "k1x7-s1x3-p0x3-d1-n1-c2to3-4x9",
    "k3-s1-p1-d1-n1-c5to5-4x4-nobias",
    "k4-s2-p1-d1-n3-c2to1-6x6-nobias",
    "k2x3-s3x2-p0x1-d2x1-n2-c3to2-7x5-nobias",
    "k5-s4-p3-d3-n1-c1to1-9x10-nobias",
    "k3-s2-p1-d1-n1-c1to2-1x2",
    "k1-s4-p0-d1-n1-c1to1-1x1",
    # the stride divides the kernel: the input gradient is a sub-pixel convolution, and the
    # forward runs on s x s blocks when Cout < Cin*s*s (else by columns: the last case)
    "k16-s8-p4-d1-n2-c3to2-20x18",
    "k4x6-s2x3-p1x2-d1-n1-c2to3-9x11",
    "k2-s2-p1-d1-n2-c1to5-5x6",
]

TRANSPOSE_CASES = [
    "k1-s1-p0-d1-n1-c1to1-3x4",
    "k1-s2-p0-op1-d1-n2-c2to3-3x2",
    "k2-s1-p0-d1-n1-c1to1-2x2",
    "k2-s2-p0-d1-n1-c1to2-3x4",
    "k2-s2-p0-op1-d1-n2-c3to2-3x3",
    "k2x3-s2x1-p1x0-d1-n1-c2to3-4x3",
    "k3-s1-p1-d1-n2-c3to4-5x4",
    "k3-s2-p1-op1-d1-n2-c2to3-4x5",
    "k3x2-s2-p1-d2-op1-n2-c3to4-7x6",
    "k3-s3-p0-d1-n1-c4to2-3x2",
    "k3-s3-p2-op2-d1-n1-c1to1-3x3",
    "k3-s1-p2-d2-n1-c2to2-4x5",
    "k3-s1-p3-op2-d3-n1-c1to3-4x5",
    "k3-s4-p1-op3-d1-n2-c3to2-3x3",
    "k4-s2-p1-d1-n1-c2to3-4x3",
    "k4-s4-p0-d1-n1-c1to1-2x3",
    "k4x2-s3x2-p2x1-op1x0-d1x2-n2-c3to2-3x4",
    "k5-s1-p2-d1-n1-c3to2-4x5",
    "k5-s2-p0-op1-d1-n2-c1to4-3x4",
    "k5x3-s1-p2x1-d1-n1-c2to5-3x4",
    "k5-s3-p3-op2-d2-n1-c2to2-3x4",
    "k6-s2-p3-d1-n1-c1to2-3x4",
    "k6x1-s1-p0-d1-n2-c2to2-3x3",
    "k7-s1-p3-d1-n1-c1to2-3x4",
    "k7-s2-p3-op1-d1-n1-c3to1-4x3",
    "k7x5-s4-p2-op3x1-d1-n2-c2to3-3x2",
    "k2-s1-p0-op2-d3-n1-c2to2-3x4",
    "k3-s2-p0-d3-n2-c1to1-3x2",
    "k1x7-s1x3-p0x3-d1-n1-c2to3-4x2",
    "k8-s4-p2-d1-n1-c2to2-3x2",
    "k3-s1-p1-d1-n1-c5to5-3x3-nobias",
    "k4-s2-p1-d1-n3-c2to1-3x3-nobias",
    "k2x3-s3x2-p0x1-op2x1-d2x1-n2-c3to2-3x2-nobias",
    "k5-s4-p3-op3-d3-n1-c1to1-2x3-nobias",
    "k3-s2-p1-d1-n1-c1to2-1x1",
    "k1-s4-p0-op3-d1-n1-c1to1-1x2",
    # FCN's upsampling shape (k = 2s) with padding, and a non-square block with output_padding
    "k16-s8-p4-d1-n2-c2to3-3x2",
    "k4x6-s2x3-p1x2-op1x0-d1-n2-c3to2-3x4",
]

ELEMENTWISE_CONV = ["k1-s1-p1-d1-n1-c2to3-3x4", "k3x2-s2-p1-d2-n2-c3to4-7x6", "k2-s1-p0-d3-n1-c2to2-5x4",
                    "k4x2-s3x2-p2x1-d1x2-n2-c3to2-7x8", "k5-s4-p3-d3-n1-c1to1-9x10-nobias"]
ELEMENTWISE_TRANSPOSE = ["k3x2-s2-p1-d2-op1-n2-c3to4-7x6", "k2-s1-p0-op2-d3-n1-c2to2-3x4",
                         "k4x2-s3x2-p2x1-op1x0-d1x2-n2-c3to2-3x4", "k4-s2-p1-d1-n1-c2to3-4x3",
                         "k2x3-s3x2-p0x1-op2x1-d2x1-n2-c3to2-3x2-nobias"]

_TOKEN = re.compile(r"^(k|s|p|d|op)(\d+)(?:x(\d+))?$")


def parse(case: str) -> dict:
    """``"k3x2-s2-p1-d2-op1-n2-c3to4-7x6"`` -> keyword arguments and shapes."""
    cfg = {"stride": (1, 1), "padding": (0, 0), "dilation": (1, 1), "output_padding": (0, 0), "bias": True}
    names = {"k": "kernel_size", "s": "stride", "p": "padding", "d": "dilation", "op": "output_padding"}
    for tok in case.split("-"):
        if tok == "nobias":
            cfg["bias"] = False
        elif m := _TOKEN.match(tok):
            a = int(m.group(2))
            cfg[names[m.group(1)]] = (a, int(m.group(3)) if m.group(3) else a)
        elif m := re.match(r"^n(\d+)$", tok):
            cfg["n"] = int(m.group(1))
        elif m := re.match(r"^c(\d+)to(\d+)$", tok):
            cfg["cin"], cfg["cout"] = int(m.group(1)), int(m.group(2))
        elif m := re.match(r"^(\d+)x(\d+)$", tok):
            cfg["hw"] = (int(m.group(1)), int(m.group(2)))
        else:
            raise ValueError(f"bad token {tok!r} in {case!r}")
    return cfg


def make_conv(case, dtype=np.float64, seed=0):
    c = parse(case)
    assert c["output_padding"] == (0, 0), f"{case}: a Conv2d has no output_padding"
    layer = Conv2d(c["cin"], c["cout"], c["kernel_size"], c["stride"], c["padding"], c["dilation"],
                   bias=c["bias"], dtype=dtype, rng=seed)
    return layer, (c["n"], c["cin"], *c["hw"])


def make_transpose(case, dtype=np.float64, seed=0):
    c = parse(case)
    layer = ConvTranspose2d(c["cin"], c["cout"], c["kernel_size"], c["stride"], c["padding"], c["output_padding"],
                            c["dilation"], bias=c["bias"], dtype=dtype, rng=seed)
    return layer, (c["n"], c["cin"], *c["hw"])


def to_xp(xp, a):
    return xp.asarray(a)


def layer_to(layer, xp):
    return layer.to("gpu") if xp is not np else layer


def test_sweeps_are_big_enough_and_cover_the_ranges():
    for cases in (CONV_CASES, TRANSPOSE_CASES):
        assert len(cases) >= 30 and len(set(cases)) == len(cases)
        cfgs = [parse(c) for c in cases]
        kernels = {k for c in cfgs for k in c["kernel_size"]}
        assert set(range(1, 8)) <= kernels
        assert any(c["kernel_size"][0] != c["kernel_size"][1] for c in cfgs)
        assert {s for c in cfgs for s in c["stride"]} >= {1, 2, 3, 4}
        assert {p for c in cfgs for p in c["padding"]} >= {0, 1, 2, 3}
        assert {d for c in cfgs for d in c["dilation"]} >= {1, 2, 3}
        assert {c["n"] for c in cfgs} == {1, 2, 3}
        assert {c["cin"] for c in cfgs} | {c["cout"] for c in cfgs} >= {1, 2, 3, 4, 5}
        assert {c["bias"] for c in cfgs} == {True, False}
        assert any(h != w and h % 2 == 1 for c in cfgs for h, w in [c["hw"]])
        assert any(h != w and h % 2 == 0 for c in cfgs for h, w in [c["hw"]])
    # both forward routes of a stride that divides the kernel: by blocks (Cout < Cin*s*s) and by columns
    divides = [c for c in map(parse, CONV_CASES) if c["dilation"] == (1, 1) and min(c["stride"]) > 1
               and all(k % s == 0 for k, s in zip(c["kernel_size"], c["stride"]))]
    assert {c["cout"] < c["cin"] * c["stride"][0] * c["stride"][1] for c in divides} == {True, False}
    ops = {o for c in TRANSPOSE_CASES for o in parse(c)["output_padding"]}
    assert ops >= {0, 1, 2, 3}
    # output_padding >= stride is legal when it is below the dilation: covered.
    assert any(parse(c)["output_padding"][0] >= parse(c)["stride"][0] for c in TRANSPOSE_CASES)


# ---------------------------------------------------------------------------
# 1. Gradient checks
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_gradcheck_random(case, xp, rng):
    layer, shape = make_conv(case)
    x = to_xp(xp, rng.standard_normal(shape))
    report = check_layer(layer_to(layer, xp), x, mode="random")
    assert report.passed and report.max_rel_err < 1e-6, str(report)
    assert {t.name for t in report.tensors} == ({"input", "weight", "bias"} if layer.bias else {"input", "weight"})


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_conv_transpose2d_gradcheck_random(case, xp, rng):
    layer, shape = make_transpose(case)
    x = to_xp(xp, rng.standard_normal(shape))
    report = check_layer(layer_to(layer, xp), x, mode="random")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", ELEMENTWISE_CONV)
def test_conv2d_gradcheck_elementwise(case, rng):
    layer, shape = make_conv(case)
    report = check_layer(layer, rng.standard_normal(shape), mode="elementwise")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", ELEMENTWISE_TRANSPOSE)
def test_conv_transpose2d_gradcheck_elementwise(case, rng):
    layer, shape = make_transpose(case)
    report = check_layer(layer, rng.standard_normal(shape), mode="elementwise")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


# ---------------------------------------------------------------------------
# 2. Agreement with the loop-based reference (forward and every gradient)
# ---------------------------------------------------------------------------
def _bias(layer):
    return None if layer.bias is None else to_numpy(layer.bias.data)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_reference(case, xp, rng, rel_err):
    layer, shape = make_conv(case)
    x = rng.standard_normal(shape)
    w, b, c = layer.weight.data.copy(), _bias(layer), parse(case)
    geometry = (c["stride"], c["padding"], c["dilation"])
    layer = layer_to(layer, xp)
    y = layer(to_xp(xp, x))
    expected = ref.conv2d(x, w, b, *geometry)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < 1e-10
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(to_xp(xp, dy))
    dx_ref, dw_ref, db_ref = ref.conv2d_backward(x, w, dy, *geometry)
    assert rel_err(dx, dx_ref) < 1e-10
    assert rel_err(layer.weight.grad, dw_ref) < 1e-10
    if layer.bias is not None:
        assert rel_err(layer.bias.grad, db_ref) < 1e-10


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_conv_transpose2d_matches_reference(case, xp, rng, rel_err):
    layer, shape = make_transpose(case)
    x = rng.standard_normal(shape)
    w, b, c = layer.weight.data.copy(), _bias(layer), parse(case)
    geometry = (c["stride"], c["padding"], c["output_padding"], c["dilation"])
    layer = layer_to(layer, xp)
    y = layer(to_xp(xp, x))
    expected = ref.conv_transpose2d(x, w, b, *geometry)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < 1e-10
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(to_xp(xp, dy))
    dx_ref, dw_ref, db_ref = ref.conv_transpose2d_backward(x, w, dy, *geometry)
    assert rel_err(dx, dx_ref) < 1e-10
    assert rel_err(layer.weight.grad, dw_ref) < 1e-10
    if layer.bias is not None:
        assert rel_err(layer.bias.grad, db_ref) < 1e-10


# ---------------------------------------------------------------------------
# 2b. Bands: unfolding a few output rows at a time changes nothing
# ---------------------------------------------------------------------------
BAND_CASES = ["k3-s1-p1-d1-n2-c3to4-7x6", "k3-s2-p1-d1-n3-c2to3-8x7", "k3x2-s2-p1-d2-n2-c3to4-7x6",
              "k1-s1-p0-d1-n1-c1to1-5x4", "k4x2-s3x2-p2x1-d1x2-n2-c3to2-7x8", "k16-s8-p4-d1-n2-c3to2-20x18"]


def _forward_backward(layer, x, dy):
    layer.zero_grad()
    y = layer(x.copy())
    dx = layer.backward(dy.copy())
    return [y, dx, layer.weight.grad.copy()] + ([layer.bias.grad.copy()] if layer.bias else [])


@pytest.mark.parametrize("case", BAND_CASES)
@pytest.mark.parametrize("which", ["conv", "transpose"])
@pytest.mark.parametrize("threads", ["1", "3"])
def test_one_row_bands_give_the_same_results(case, which, threads, rng, monkeypatch):
    """Every layer output and gradient is identical whether a band holds the
    whole image or a single output row (the band loop must cover each row once),
    with the bands run in one thread or shared by three (minifcn.parallel)."""
    workers_seen = []

    def spy(bands, work, workers):
        workers_seen.append(workers)
        return parallel.run_bands(bands, work, workers)

    monkeypatch.setenv("MINIFCN_NUM_THREADS", threads)
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")  # the bands are the fast routes' (also under a textbook CI run)
    monkeypatch.setattr(conv_fast, "run_bands", spy)

    if which == "conv":
        layer, shape = make_conv(case)
    else:
        c = parse(case)
        layer = ConvTranspose2d(c["cout"], c["cin"], c["kernel_size"], c["stride"], c["padding"],
                                dilation=c["dilation"], bias=c["bias"], dtype=np.float64, rng=0)
        shape = Conv2d(c["cin"], c["cout"], c["kernel_size"], c["stride"], c["padding"], c["dilation"]).output_shape(
            (c["n"], c["cin"], *c["hw"]))
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(layer.output_shape(shape))
    whole = _forward_backward(layer, x, dy)
    monkeypatch.setitem(columns.BAND_BYTES, "numpy", 1)
    monkeypatch.setattr(columns, "MIN_COPY_BYTES", 1)
    monkeypatch.setattr(columns, "BAND_CHANNELS", 10**6)
    rows = _forward_backward(layer, x, dy)
    for a, b in zip(whole, rows):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    threaded = threads != "1" and x.shape[0] > 1 and parallel._blas_controller() is not None
    assert (max(workers_seen) > 1) == threaded, workers_seen


def test_bands_tile_the_output_rows():
    u = columns.Unfolding((2, 8, 50, 40), (3, 3), (1, 1), (1, 1), (1, 1))
    for budget_channels in (8, 64):
        bands = list(u.bands(np, 4, budget_channels))
        assert bands[0][0] == 0 and bands[-1][1] == 50
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(bands, bands[1:]))
    assert list(u.bands(np, 4, 65)) == [(0, 50)]  # many output channels: one product


@pytest.mark.parametrize("route_name", ["textbook", "bands"])
def test_weight_grad_accumulates_into_the_given_array_and_rejects_a_bad_one(route_name, rng):
    from minifcn import routes

    conv2d_weight_grad = next(r.fn for r in routes.routes("conv_weight_grad") if r.name == route_name)
    x, dy = rng.standard_normal((2, 3, 6, 5)), rng.standard_normal((2, 4, 6, 5))
    geometry = ((1, 1), (1, 1), (1, 1))
    fresh = conv2d_weight_grad(dy, x, (4, 3, 3, 3), *geometry)
    grad = np.ones((4, 3, 3, 3))
    assert conv2d_weight_grad(dy, x, (4, 3, 3, 3), *geometry, accumulate=grad) is grad
    np.testing.assert_allclose(grad, fresh + 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 3, 3\) \(C-contiguous: True\)"):
        conv2d_weight_grad(dy, x, (4, 3, 3, 3), *geometry, accumulate=np.zeros((3, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"got shape \(4, 3, 3, 3\) \(C-contiguous: False\)"):
        conv2d_weight_grad(dy, x, (4, 3, 3, 3), *geometry, accumulate=np.zeros((3, 4, 3, 3)).transpose(1, 0, 2, 3))


def test_input_grad_off_skips_dx_and_keeps_parameter_gradients(rng):
    layer, shape = make_conv("k3-s1-p1-d1-n2-c3to4-7x6")
    x, dy = rng.standard_normal(shape), rng.standard_normal(layer.output_shape(shape))
    with_dx = _forward_backward(layer, x, dy)
    layer.input_grad = False
    without = _forward_backward(layer, x, dy)
    assert without[1] is None
    for a, b in zip(with_dx[2:], without[2:]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# 3. The adjoint relation: ConvTranspose2d is C^T for the Conv2d C
# ---------------------------------------------------------------------------
def _adjoint_pair(case, seed=0):
    """Conv2d a -> b and the ConvTranspose2d b -> a sharing its weight, sized so
    the transpose maps the convolution's output shape back to its input shape."""
    c = parse(case)
    (h, w), k, s, p, d = c["hw"], c["kernel_size"], c["stride"], c["padding"], c["dilation"]
    conv = Conv2d(c["cin"], c["cout"], k, s, p, d, bias=False, dtype=np.float64, rng=seed)
    # The rows the convolution's floor division dropped come back as output_padding.
    op = tuple((size + 2 * p[a] - d[a] * (k[a] - 1) - 1) % s[a] for a, size in enumerate((h, w)))
    convt = ConvTranspose2d(c["cout"], c["cin"], k, s, p, op, d, bias=False, dtype=np.float64)
    convt.weight.data = conv.weight.data  # (b, a, kh, kw) is both layers' layout
    return conv, convt, (c["n"], c["cin"], h, w)


@pytest.mark.parametrize("case", CONV_CASES)
def test_adjoint_identity(case, xp, rng):
    conv, convt, shape = _adjoint_pair(case)
    conv, convt = layer_to(conv, xp), layer_to(convt, xp)
    x = to_xp(xp, rng.standard_normal(shape))
    cx = conv(x)
    y = to_xp(xp, rng.standard_normal(cx.shape))
    cty = convt(y)
    assert cty.shape == x.shape
    lhs, rhs = float((cx * y).sum()), float((x * cty).sum())
    scale = float(xp.abs(cx * y).sum())  # the inner product's own rounding scale
    assert abs(lhs - rhs) <= 1e-10 * max(abs(lhs), scale)


def test_explicit_matrix_of_a_tiny_convolution(rng):
    """Build C column by column from unit vectors and compare both layers with C^T."""
    conv = Conv2d(2, 3, (3, 2), stride=2, padding=1, bias=False, dtype=np.float64, rng=3)
    x_shape = (1, 2, 4, 5)
    y_shape = conv.output_shape(x_shape)
    n_in, n_out = int(np.prod(x_shape)), int(np.prod(y_shape))
    cmat = np.zeros((n_out, n_in))
    for k in range(n_in):
        e = np.zeros(n_in)
        e[k] = 1.0
        cmat[:, k] = conv(e.reshape(x_shape)).ravel()
    x = rng.standard_normal(x_shape)
    np.testing.assert_allclose(conv(x).ravel(), cmat @ x.ravel(), rtol=1e-12, atol=1e-12)

    op = tuple((x_shape[2 + a] + 2 - (conv.kernel_size[a] - 1) - 1) % 2 for a in (0, 1))
    convt = ConvTranspose2d(3, 2, (3, 2), stride=2, padding=1, output_padding=op, bias=False, dtype=np.float64)
    convt.weight.data = conv.weight.data.copy()
    y = rng.standard_normal(y_shape)
    np.testing.assert_allclose(convt(y).ravel(), cmat.T @ y.ravel(), rtol=1e-12, atol=1e-12)

    conv(x)
    dy = rng.standard_normal(y_shape)
    np.testing.assert_allclose(conv.backward(dy).ravel(), cmat.T @ dy.ravel(), rtol=1e-12, atol=1e-12)
    # And the transpose's backward is C itself.
    np.testing.assert_allclose(convt.backward(x).ravel(), cmat @ x.ravel(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# 4. A transposed convolution worked by hand
# ---------------------------------------------------------------------------
def test_conv_transpose_worked_example():
    """x = [[1, 2], [3, 4]], kernel K = [[1, 2], [3, 4]], no padding.

    Each input pixel x[h, w] stamps x[h, w] * K with its top-left corner at
    (h*s, w*s); overlapping stamps add. The four stamps are
        x00=1: [[1, 2], [3, 4]]      x01=2: [[2, 4], [6, 8]]
        x10=3: [[3, 6], [9, 12]]     x11=4: [[4, 8], [12, 16]]

    Stride 1 (output (2-1)*1 + 2 = 3): stamps at (0,0), (0,1), (1,0), (1,1)
        [0,0] = 1                 [0,1] = 2 + 2 = 4             [0,2] = 4
        [1,0] = 3 + 3 = 6         [1,1] = 4 + 6 + 6 + 4 = 20    [1,2] = 8 + 8 = 16
        [2,0] = 9                 [2,1] = 12 + 12 = 24          [2,2] = 16
    Stride 2 (output (2-1)*2 + 2 = 4): stamps at (0,0), (0,2), (2,0), (2,2), no overlap.
    Both sum to sum(x) * sum(K) = 10 * 10 = 100. Note that the stride-1 result
    is the *full convolution* of x with K (not with K flipped): the scatter
    places K[i, j] at offset +(i, j), there is no kernel flip to undo.
    """
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    kernel = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    expected = {
        1: np.array([[1, 4, 4],
                     [6, 20, 16],
                     [9, 24, 16]], dtype=np.float64),
        2: np.array([[1, 2, 2, 4],
                     [3, 4, 6, 8],
                     [3, 6, 4, 8],
                     [9, 12, 12, 16]], dtype=np.float64),
    }
    for stride, want in expected.items():
        layer = ConvTranspose2d(1, 1, 2, stride=stride, bias=False, dtype=np.float64)
        layer.weight.data[...] = kernel
        got = layer(x)[0, 0]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(ref.conv_transpose2d(x, kernel, None, stride)[0, 0], want)
        assert want.sum() == 100


def test_conv2d_worked_example():
    """Cross-correlation (no flip): a 3x3 input [[1..9]] with K = [[1, 2], [3, 4]]:
    y[0,0] = 1*1 + 2*2 + 4*3 + 5*4 = 37, y[0,1] = 2 + 6 + 15 + 24 = 47,
    y[1,0] = 4 + 10 + 21 + 32 = 67,      y[1,1] = 5 + 12 + 24 + 36 = 77; plus bias 0.5."""
    x = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    layer = Conv2d(1, 1, 2, dtype=np.float64)
    layer.weight.data[...] = [[[[1, 2], [3, 4]]]]
    layer.bias.data[...] = 0.5
    want = np.array([[37.5, 47.5], [67.5, 77.5]])
    np.testing.assert_array_equal(layer(x)[0, 0], want)
    np.testing.assert_array_equal(ref.conv2d(x, layer.weight.data, layer.bias.data)[0, 0], want)


# ---------------------------------------------------------------------------
# 5. Output sizes
# ---------------------------------------------------------------------------
def _count_windows(size, k, s, p, d):
    """How many window starts t = 0, s, 2s, ... fit: t + d(k-1) <= size + 2p - 1."""
    count, t = 0, 0
    while t + d * (k - 1) <= size + 2 * p - 1:
        count, t = count + 1, t + s
    return count


def test_conv_output_size_formula_many_sizes():
    checked = 0
    for size in range(1, 13):
        for k in range(1, 8):
            for s in range(1, 5):
                for p in range(4):
                    for d in range(1, 4):
                        if size + 2 * p < d * (k - 1) + 1:
                            continue
                        want = (size + 2 * p - d * (k - 1) - 1) // s + 1
                        assert conv_output_size(size, k, s, p, d) == want == _count_windows(size, k, s, p, d)
                        checked += 1
    assert checked > 2500


def test_conv_transpose_output_size_formula_many_sizes():
    for size in range(1, 10):
        for k in range(1, 8):
            for s in range(1, 5):
                for p in range(4):
                    for d in range(1, 4):
                        for op in range(max(s, d)):
                            out = conv_transpose_output_size(size, k, s, p, op, d)
                            assert out == (size - 1) * s - 2 * p + d * (k - 1) + op + 1
                            if out >= 1 and op < s:
                                # The convolution with the same geometry maps it back to `size`.
                                assert conv_output_size(out, k, s, p, d) == size


@pytest.mark.parametrize("hw", [(1, 1), (5, 4), (8, 9), (11, 6)], ids=lambda hw: f"{hw[0]}x{hw[1]}")
def test_layer_output_shapes(hw):
    x = np.zeros((2, 1, *hw))
    for k, s, p, d in [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 1, 2), (4, 3, 2, 1), (2, 4, 0, 3), ((3, 1), (2, 3), (1, 0), 1)]:
        conv = Conv2d(1, 2, k, s, p, d, dtype=np.float64)
        kk, ss, pp, dd = conv.kernel_size, conv.stride, conv.padding, conv.dilation
        if any(hw[a] + 2 * pp[a] < dd[a] * (kk[a] - 1) + 1 for a in (0, 1)):
            continue
        want = (2, 2) + tuple((hw[a] + 2 * pp[a] - dd[a] * (kk[a] - 1) - 1) // ss[a] + 1 for a in (0, 1))
        assert conv(x).shape == conv.output_shape(x.shape) == want
        for op in range(max(ss + dd)):
            ops = tuple(min(op, max(ss[a], dd[a]) - 1) for a in (0, 1))
            convt = ConvTranspose2d(1, 2, k, s, p, ops, d, dtype=np.float64)
            want_t = (2, 2) + tuple((hw[a] - 1) * ss[a] - 2 * pp[a] + dd[a] * (kk[a] - 1) + ops[a] + 1 for a in (0, 1))
            if min(want_t[2:]) < 1:
                continue
            assert convt(x).shape == convt.output_shape(x.shape) == want_t


# ---------------------------------------------------------------------------
# 6. float32 agrees with float64 and stays float32
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("maker,case", [
    (make_conv, "k3-s1-p1-d1-n2-c3to4-7x6"), (make_conv, "k3x2-s2-p1-d2-n2-c3to4-7x6"),
    (make_conv, "k1-s1-p0-d1-n1-c1to1-5x4"), (make_conv, "k5-s4-p3-d3-n1-c1to1-9x10-nobias"),
    (make_transpose, "k3x2-s2-p1-d2-op1-n2-c3to4-7x6"), (make_transpose, "k4-s2-p1-d1-n1-c2to3-4x3"),
    (make_transpose, "k1-s1-p0-d1-n1-c1to1-3x4"), (make_transpose, "k2-s1-p0-op2-d3-n1-c2to2-3x4"),
], ids=lambda v: v if isinstance(v, str) else v.__name__[5:])
def test_float32_matches_float64_and_stays_float32(maker, case, xp, rng, rel_err):
    layer64, shape = maker(case, dtype=np.float64)
    layer32, _ = maker(case, dtype=np.float32)
    for p32, p64 in zip(layer32.parameters(), layer64.parameters()):
        p32.data[...] = p64.data.astype(np.float32)
        p64.data[...] = p32.data  # both start from the same (float32-representable) weights
    layer32, layer64 = layer_to(layer32, xp), layer_to(layer64, xp)
    x = rng.standard_normal(shape).astype(np.float32)
    y32, y64 = layer32(to_xp(xp, x)), layer64(to_xp(xp, x.astype(np.float64)))
    assert y32.dtype == np.float32
    assert rel_err(y32, y64) < 1e-4
    dy = rng.standard_normal(y64.shape).astype(np.float32)
    dx32, dx64 = layer32.backward(to_xp(xp, dy)), layer64.backward(to_xp(xp, dy.astype(np.float64)))
    assert dx32.dtype == np.float32
    assert rel_err(dx32, dx64) < 1e-4
    for p32, p64 in zip(layer32.parameters(), layer64.parameters()):
        assert p32.data.dtype == p32.grad.dtype == np.float32
        assert rel_err(p32.grad, p64.grad) < 1e-4


# ---------------------------------------------------------------------------
# 7. Clear errors
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [Conv2d, ConvTranspose2d])
def test_errors_on_bad_inputs(cls):
    layer = cls(2, 3, 3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"ndim=3"):
        layer(np.zeros((2, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"expected 2 input channels, got 4"):
        layer(np.zeros((1, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match=r"input dtype float64 does not match weight dtype float32"):
        layer(np.zeros((1, 2, 5, 5), np.float64))
    with pytest.raises(ValueError, match=r"int64"):
        layer(np.zeros((1, 2, 5, 5), np.int64))
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        layer.backward(np.zeros((1, 3, 3, 3), np.float32))
    y = layer(np.zeros((1, 2, 5, 5), np.float32))
    bad = (1, 3, y.shape[2] + 1, y.shape[3])
    with pytest.raises(ValueError, match=re.escape(f"upstream gradient has shape {bad}")):
        layer.backward(np.zeros(bad, np.float32))


def test_conv2d_kernel_larger_than_padded_input():
    with pytest.raises(ValueError, match=r"kernel extent 5 .* padded input H=3\+2\*0"):
        Conv2d(1, 1, 5)(np.zeros((1, 1, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"kernel extent 7 .* padded input W=4\+2\*1"):
        Conv2d(1, 1, 3, padding=1, dilation=3)(np.zeros((1, 1, 9, 4), np.float32))
    Conv2d(1, 1, 5, padding=1)(np.zeros((1, 1, 3, 3), np.float32))  # 3 + 2 = 5 fits exactly


def test_conv_transpose_output_padding_limits():
    with pytest.raises(ValueError, match=r"output_padding=\(2, 2\) .* stride=\(2, 2\) or dilation=\(1, 1\)"):
        ConvTranspose2d(1, 1, 3, stride=2, output_padding=2)
    with pytest.raises(ValueError, match=r"output_padding=\(0, 1\)"):
        ConvTranspose2d(1, 1, 3, stride=(2, 1), output_padding=(0, 1))
    # Smaller than the dilation is enough (PyTorch's rule), even when not smaller than the stride.
    ConvTranspose2d(1, 1, 3, stride=1, dilation=3, output_padding=2)
    with pytest.raises(ValueError, match=r"output size \(-1, -1\) is not positive"):
        ConvTranspose2d(1, 1, 1, padding=1)(np.zeros((1, 1, 1, 1), np.float32))


def test_bad_geometry_arguments():
    with pytest.raises(ValueError, match=r"stride must be >= 1, got 0"):
        Conv2d(1, 1, 3, stride=0)
    with pytest.raises(ValueError, match=r"kernel_size must be an int or a pair of ints, got \(1, 2, 3\)"):
        Conv2d(1, 1, (1, 2, 3))
    with pytest.raises(ValueError, match=r"padding must be >= 0, got -1"):
        ConvTranspose2d(1, 1, 3, padding=-1)
    with pytest.raises(ValueError, match=r"in=0"):
        Conv2d(0, 1, 3)


# ---------------------------------------------------------------------------
# 12. PyTorch, if installed
# ---------------------------------------------------------------------------
@pytest.mark.torch
@pytest.mark.parametrize("case", ["k3-s1-p1-d1-n2-c3to4-7x6", "k3x2-s2-p1-d2-n2-c3to4-7x6", "k5-s3-p3-d2-n1-c2to2-6x7",
                                  "k4x2-s3x2-p2x1-d1x2-n2-c3to2-7x8"])
def test_conv2d_matches_torch(case, rng, rel_err):
    torch = pytest.importorskip("torch")
    layer, shape = make_conv(case)
    c = parse(case)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.weight.data, requires_grad=True)
    tb = torch.tensor(layer.bias.data, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tw, tb, c["stride"], c["padding"], c["dilation"])
    y = layer(x)
    assert rel_err(y, ty.detach().numpy()) < 1e-10
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert rel_err(layer.backward(dy), tx.grad.numpy()) < 1e-10
    assert rel_err(layer.weight.grad, tw.grad.numpy()) < 1e-10
    assert rel_err(layer.bias.grad, tb.grad.numpy()) < 1e-10


@pytest.mark.torch
@pytest.mark.parametrize("case", ["k3x2-s2-p1-d2-op1-n2-c3to4-7x6", "k4-s2-p1-d1-n1-c2to3-4x3",
                                  "k2-s1-p0-op2-d3-n1-c2to2-3x4", "k7x5-s4-p2-op3x1-d1-n2-c2to3-3x2"])
def test_conv_transpose2d_matches_torch(case, rng, rel_err):
    torch = pytest.importorskip("torch")
    layer, shape = make_transpose(case)
    c = parse(case)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    tw = torch.tensor(layer.weight.data, requires_grad=True)
    tb = torch.tensor(layer.bias.data, requires_grad=True)
    ty = torch.nn.functional.conv_transpose2d(tx, tw, tb, c["stride"], c["padding"], c["output_padding"], 1,
                                              c["dilation"])
    y = layer(x)
    assert rel_err(y, ty.detach().numpy()) < 1e-10
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert rel_err(layer.backward(dy), tx.grad.numpy()) < 1e-10
    assert rel_err(layer.weight.grad, tw.grad.numpy()) < 1e-10
    assert rel_err(layer.bias.grad, tb.grad.numpy()) < 1e-10


# -- a layer's input changed in place between forward and backward ------------------------------

CHANGES = {
    "zeroed": lambda x: x.__setitem__(Ellipsis, 0),
    "next batch": lambda x: x.__setitem__(Ellipsis, np.random.default_rng(9).standard_normal(x.shape)),
    "one image": lambda x: x[1].__imul__(2),
    "one channel": lambda x: x[0, 2].__iadd__(1),
    "four rows": lambda x: x[1, 1, 3:7].__isub__(0.5),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("layer", ["Conv2d", "ConvTranspose2d"])
def test_an_input_changed_between_forward_and_backward_is_detected(layer, change, rng):
    """PyTorch raises here; so does minifcn, instead of returning the weight gradient of another input."""
    conv = (Conv2d(3, 4, 3, padding=1, dtype=np.float64) if layer == "Conv2d" else
            ConvTranspose2d(3, 4, 4, stride=2, padding=1, dtype=np.float64))
    x = rng.standard_normal((2, 3, 16, 16))
    dy = rng.standard_normal(conv(x).shape)
    CHANGES[change](x)
    with pytest.raises(RuntimeError, match=rf"{layer}: its input \(shape \(2, 3, 16, 16\)\) was changed in place"):
        conv.backward(dy)


def test_an_unchanged_input_and_the_finite_difference_loop_are_fine(rng):
    """Forward, backward, then change the input (or forward twice, changing it between: the
    finite-difference loop): nothing raises and the gradient is the one of the input forward saw."""
    conv = Conv2d(2, 3, 3, dtype=np.float64)
    x = rng.standard_normal((1, 2, 8, 8))
    dy = rng.standard_normal(conv(x).shape)
    x[0, 0, 0, 0] += 1e-5
    conv(x)
    x[0, 0, 0, 0] -= 1e-5  # a new forward saved the changed input: no complaint
    conv(x)
    conv.backward(dy)
    expected = conv.weight.grad.copy()
    conv.zero_grad()
    x_nc = np.asfortranarray(x)  # any memory layout
    conv(x_nc)
    conv.backward(dy)
    np.testing.assert_allclose(conv.weight.grad, expected, rtol=1e-12)
    x_nc[...] = 0
    with pytest.raises(RuntimeError, match="changed in place"):
        conv.backward(dy)


def test_a_whole_model_detects_a_changed_image(rng):
    from minifcn.models import build_model  # noqa: PLC0415
    model = build_model("fcn32s", num_classes=3, width=1 / 32, seed=0)
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    y = model(x)
    x -= 0.5  # e.g. normalising the batch after the forward
    with pytest.raises(RuntimeError, match="Conv2d: its input .* was changed in place"):
        model.backward(np.ones_like(y))


@pytest.mark.parametrize("dtype", [np.int64, np.int32, bool])
def test_an_integer_upstream_gradient_is_refused_naming_its_dtype(dtype, rng):
    conv = Conv2d(2, 3, 3)
    y = conv(rng.standard_normal((1, 2, 6, 6)).astype(np.float32))
    with pytest.raises(ValueError, match=rf"Conv2d: upstream gradient must be float32 or float64, got dtype "
                                         rf"{np.dtype(dtype)}"):
        conv.backward(np.ones(y.shape, dtype=dtype))
