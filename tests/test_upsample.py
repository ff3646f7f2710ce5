"""Upsample (nearest and bilinear, align_corners=False): gradients, the per-pixel
reference, hand-worked values, output sizes, dtypes and errors.

A configuration is its id: ``bilinear-x1.5-n2-c3-4x5`` (scale factor 1.5) or
``nearest-to7x5-n1-c2-3x4`` (an explicit output size).
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from minifcn import reference as ref
from minifcn.gradcheck import check_layer
from minifcn.layers import Upsample, interpolation_matrix

_GEOMETRIES = ["x2-n1-c1-3x4", "x3-n2-c2-2x3", "x2x3-n1-c2-3x2", "x1.5-n2-c3-4x5", "x0.5-n1-c1-6x4",
               "x2.5x1.25-n1-c2-3x4", "to7x5-n1-c2-3x4", "to2x3-n2-c1-5x7", "to6x6-n1-c1-1x1", "x4-n3-c1-2x2",
               "to8x9-n1-c1-3x3", "to5x5-n1-c2-5x5"]
CASES = [f"{mode}-{g}" for mode in ("nearest", "bilinear") for g in _GEOMETRIES]
ELEMENTWISE = ["bilinear-x2x3-n1-c2-3x2", "bilinear-to7x5-n1-c2-3x4", "nearest-x1.5-n2-c3-4x5"]


def parse(case):
    """``"bilinear-x2x3-n1-c2-3x2"`` -> (mode, Upsample kwargs, reference kwargs, input shape)."""
    mode, geo, n, c, hw = case.split("-")
    h, w = map(int, hw.split("x"))
    shape = (int(n[1:]), int(c[1:]), h, w)
    if geo.startswith("to"):
        size = tuple(map(int, geo[2:].split("x")))
        return mode, {"size": size}, {"out_hw": size}, shape
    scales = tuple(float(v) for v in re.findall(r"[\d.]+", geo[1:]))
    scale = scales[0] if len(scales) == 1 else scales
    return mode, {"scale_factor": scale}, {"scale": scale}, shape


def make(case):
    mode, layer_kw, ref_kw, shape = parse(case)
    return Upsample(mode=mode, **layer_kw), mode, ref_kw, shape


@pytest.mark.parametrize("case", CASES)
def test_upsample_gradcheck_random(case, xp, rng):
    layer, _, _, shape = make(case)
    report = check_layer(layer, xp.asarray(rng.standard_normal(shape)), mode="random")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", ELEMENTWISE)
def test_upsample_gradcheck_elementwise(case, rng):
    layer, _, _, shape = make(case)
    report = check_layer(layer, rng.standard_normal(shape), mode="elementwise")
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", CASES)
def test_upsample_matches_reference(case, xp, rng, rel_err):
    layer, mode, ref_kw, shape = make(case)
    forward = ref.upsample_nearest if mode == "nearest" else ref.upsample_bilinear
    backward = ref.upsample_nearest_backward if mode == "nearest" else ref.upsample_bilinear_backward
    x = rng.standard_normal(shape)
    y = layer(xp.asarray(x))
    expected = forward(x, **ref_kw)
    assert y.shape == expected.shape
    assert rel_err(y, expected) < 1e-12
    dy = rng.standard_normal(y.shape)
    assert rel_err(layer.backward(xp.asarray(dy)), backward(x.shape, dy, **ref_kw)) < 1e-12


def test_bilinear_worked_example():
    """Scale 2, half-pixel centres: output p sits at src = (p + 0.5) / 2 - 0.5, so
    along one axis [a, b] -> [a, 0.75a + 0.25b, 0.25a + 0.75b, b]
    (src = -0.25 clamps to 0, then 0.25, 0.75, and 1.25 whose neighbour clamps to b).
    For [[1, 2], [3, 4]]: rows 1 -> [1, 1.25, 1.75, 2], 3 -> [3, 3.25, 3.75, 4],
    then the same mix down the columns (row weights 1, .75/.25, .25/.75, 1)."""
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]])
    want = np.array([[1.0, 1.25, 1.75, 2.0],
                     [1.5, 1.75, 2.25, 2.5],      # 0.75 * row0 + 0.25 * row1
                     [2.5, 2.75, 3.25, 3.5],      # 0.25 * row0 + 0.75 * row1
                     [3.0, 3.25, 3.75, 4.0]])
    np.testing.assert_allclose(Upsample(scale_factor=2, mode="bilinear")(x)[0, 0], want, rtol=0, atol=1e-15)
    np.testing.assert_allclose(ref.upsample_bilinear(x, scale=2)[0, 0], want, rtol=0, atol=1e-15)
    # Nearest copies: output p reads input floor(p / 2).
    want_nearest = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]], dtype=np.float64)
    np.testing.assert_array_equal(Upsample(scale_factor=2)(x)[0, 0], want_nearest)
    # Backward of nearest: each input pixel collects its 2x2 block of dy.
    up = Upsample(scale_factor=2)
    up(x)
    np.testing.assert_array_equal(up.backward(np.ones((1, 1, 4, 4))), np.full((1, 1, 2, 2), 4.0))


def test_interpolation_matrix_rows_are_convex_combinations():
    for in_len in range(1, 7):
        for out_len in range(1, 13):
            for mode in ("nearest", "bilinear"):
                a = interpolation_matrix(in_len, out_len, mode)
                assert a.shape == (out_len, in_len)
                np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-15)
                assert (a >= 0).all() and ((a > 0).sum(axis=1) <= 2).all()


def test_output_sizes():
    for h in range(1, 9):
        for w in (1, 4, 7):
            for scale in (1, 2, 3, 0.5, 1.5, 2.25):
                up = Upsample(scale_factor=scale)
                want = (math.floor(h * scale), math.floor(w * scale))
                if min(want) < 1:
                    with pytest.raises(ValueError, match=r"is empty"):
                        up(np.zeros((1, 1, h, w)))
                    continue
                assert up(np.zeros((1, 1, h, w))).shape == (1, 1, *want)
                assert up.output_hw(h, w) == want
            assert Upsample(size=(5, 3), mode="bilinear")(np.zeros((2, 1, h, w))).shape == (2, 1, 5, 3)
            assert Upsample(size=4)(np.zeros((1, 1, h, w))).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("case", ["bilinear-x2-n1-c1-3x4", "bilinear-to7x5-n1-c2-3x4", "nearest-x1.5-n2-c3-4x5"])
def test_float32_matches_float64_and_stays_float32(case, xp, rng, rel_err):
    layer, _, _, shape = make(case)
    x = rng.standard_normal(shape)
    y64 = layer(xp.asarray(x))
    dy = rng.standard_normal(y64.shape)
    dx64 = layer.backward(xp.asarray(dy))
    y32 = layer(xp.asarray(x.astype(np.float32)))
    dx32 = layer.backward(xp.asarray(dy.astype(np.float32)))
    assert y32.dtype == dx32.dtype == np.float32
    assert rel_err(y32, y64) < 1e-4 and rel_err(dx32, dx64) < 1e-4


def test_errors():
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'bicubic'"):
        Upsample(scale_factor=2, mode="bicubic")
    with pytest.raises(ValueError, match=r"exactly one of scale_factor and size"):
        Upsample(scale_factor=2, size=(4, 4))
    with pytest.raises(ValueError, match=r"exactly one of scale_factor and size"):
        Upsample()
    with pytest.raises(ValueError, match=r"scale_factor must be a positive number or pair, got -2"):
        Upsample(scale_factor=-2)
    with pytest.raises(ValueError, match=r"size must be integers, got \(2.5, 3\)"):
        Upsample(size=(2.5, 3))
    with pytest.raises(ValueError, match=r"got 'cubic'"):
        interpolation_matrix(3, 6, "cubic")
    up = Upsample(scale_factor=2)
    with pytest.raises(ValueError, match=r"ndim=2"):
        up(np.zeros((3, 3)))
    with pytest.raises(RuntimeError, match=r"backward called before forward"):
        up.backward(np.zeros((1, 1, 6, 6)))
    up(np.zeros((1, 1, 3, 3)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 1, 3, 3\)"):
        up.backward(np.zeros((1, 1, 3, 3)))


@pytest.mark.torch
@pytest.mark.parametrize("case", ["bilinear-x2-n1-c1-3x4", "bilinear-x1.5-n2-c3-4x5", "bilinear-to7x5-n1-c2-3x4",
                                  "bilinear-to2x3-n2-c1-5x7", "bilinear-x0.5-n1-c1-6x4", "nearest-x1.5-n2-c3-4x5",
                                  "nearest-to7x5-n1-c2-3x4", "nearest-x3-n2-c2-2x3"])
def test_upsample_matches_torch(case, rng, rel_err):
    torch = pytest.importorskip("torch")
    layer, mode, _, shape = make(case)
    x = rng.standard_normal(shape)
    tx = torch.tensor(x, requires_grad=True)
    kwargs = {"size": layer.size} if layer.size is not None else {"scale_factor": layer.scale_factor}
    if mode == "bilinear":
        kwargs["align_corners"] = False
    ty = torch.nn.functional.interpolate(tx, mode=mode, **kwargs)
    y = layer(x)
    assert rel_err(y, ty.detach().numpy()) < 1e-12
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert rel_err(layer.backward(dy), tx.grad.numpy()) < 1e-12
