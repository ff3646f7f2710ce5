"""Crop, Add, Concat and Scale: gradients, the reference crop, dtypes and errors."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn import reference as ref
from minifcn.gradcheck import check_layer
from minifcn.layers import Add, Concat, Crop, Scale

CROP_CASES = [  # (offset, input shape, reference size)
    ((0, 0), (1, 1, 4, 5), (4, 5)),
    ((1, 2), (2, 3, 6, 7), (3, 4)),
    ((3, 0), (1, 2, 5, 5), (2, 5)),
    ((2, 1), (3, 1, 7, 4), (5, 3)),
]
CROP_IDS = [f"off{o[0]}x{o[1]}-n{s[0]}-c{s[1]}-{s[2]}x{s[3]}-to{r[0]}x{r[1]}" for o, s, r in CROP_CASES]


@pytest.mark.parametrize("offset,shape,size", CROP_CASES, ids=CROP_IDS)
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_crop_gradcheck(offset, shape, size, mode, xp, rng):
    x = xp.asarray(rng.standard_normal(shape))
    report = check_layer(Crop(offset), x, size, mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)
    # A reference array instead of a size: it gets no gradient, x does.
    refarr = xp.zeros((shape[0], 1, *size))
    report = check_layer(Crop(offset), x, refarr, mode=mode)
    assert report.passed and [t.name for t in report.tensors] == ["input"], str(report)


@pytest.mark.parametrize("offset,shape,size", CROP_CASES, ids=CROP_IDS)
def test_crop_matches_reference(offset, shape, size, xp, rng, rel_err):
    x = rng.standard_normal(shape)
    layer = Crop(offset)
    y = layer(xp.asarray(x), np.zeros((1, 1, *size)))
    assert rel_err(y, ref.crop(x, offset, size)) == 0.0
    dy = rng.standard_normal(y.shape)
    assert rel_err(layer.backward(xp.asarray(dy)), ref.crop_backward(x.shape, dy, offset)) == 0.0


def test_crop_fcn32s_offset():
    """FCN-32s: a 500x375 image gives a 576x448 upscore map; Crop(19) takes
    rows 19..518 and columns 19..393 back to the image's size."""
    x = np.zeros((1, 1, 576, 448), np.float32)
    x[0, 0, 19, 19] = 1.0
    x[0, 0, 18, 19] = 5.0
    y = Crop(19)(x, (500, 375))
    assert y.shape == (1, 1, 500, 375) and y.dtype == np.float32
    assert y[0, 0, 0, 0] == 1.0 and y.sum() == 1.0


@pytest.mark.parametrize("shape", [(1, 1, 2, 3), (2, 3, 4, 4)], ids=["n1-c1-2x3", "n2-c3-4x4"])
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_add_concat_scale_gradcheck(shape, mode, xp, rng):
    a, b = xp.asarray(rng.standard_normal(shape)), xp.asarray(rng.standard_normal(shape))
    report = check_layer(Add(), a, b, mode=mode)
    assert report.passed and {t.name for t in report.tensors} == {"input0", "input1"}, str(report)
    c = xp.asarray(rng.standard_normal((shape[0], 2, *shape[2:])))
    report = check_layer(Concat(), a, c, b, mode=mode)
    assert report.passed and {t.name for t in report.tensors} == {"input0", "input1", "input2"}, str(report)
    for factor in (0.01, 1e-4, -3.0):
        report = check_layer(Scale(factor), a, mode=mode)
        assert report.passed and report.max_rel_err < 1e-6, str(report)


def test_add_concat_scale_values(rng):
    a, b = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 2, 4, 5))
    add = Add()
    np.testing.assert_array_equal(add(a, a * 2), a * 3)
    dy = rng.standard_normal(a.shape)
    da, db = add.backward(dy)
    np.testing.assert_array_equal(da, dy)
    np.testing.assert_array_equal(db, dy)
    cat = Concat()
    y = cat(a, b)
    assert y.shape == (2, 5, 4, 5)
    np.testing.assert_array_equal(y[:, :3], a)
    np.testing.assert_array_equal(y[:, 3:], b)
    g = rng.standard_normal(y.shape)
    ga, gb = cat.backward(g)
    np.testing.assert_array_equal(ga, g[:, :3])
    np.testing.assert_array_equal(gb, g[:, 3:])
    scale = Scale(0.01)
    np.testing.assert_allclose(scale(a), 0.01 * a, rtol=1e-15)
    np.testing.assert_allclose(scale.backward(dy), 0.01 * dy, rtol=1e-15)


def test_float32_stays_float32(xp, rng, rel_err):
    a = rng.standard_normal((2, 3, 6, 5))
    b = rng.standard_normal((2, 3, 6, 5))
    a32, b32 = xp.asarray(a.astype(np.float32)), xp.asarray(b.astype(np.float32))
    a64, b64 = xp.asarray(a), xp.asarray(b)
    crop32, crop64 = Crop((1, 2)), Crop((1, 2))
    checks = [
        (crop32(a32, (4, 2)), crop64(a64, (4, 2)), crop32, crop64),
        (Add()(a32, b32), a64 + b64, None, None),
        (Concat()(a32, b32), xp.concatenate([a64, b64], axis=1), None, None),
        (Scale(1e-4)(a32), 1e-4 * a64, None, None),
    ]
    for y32, y64, l32, l64 in checks:
        assert y32.dtype == np.float32 and rel_err(y32, y64) < 1e-4
        if l32 is not None:
            dy = rng.standard_normal(y32.shape)
            dx32, dx64 = l32.backward(xp.asarray(dy.astype(np.float32))), l64.backward(xp.asarray(dy))
            assert dx32.dtype == np.float32 and rel_err(dx32, dx64) < 1e-4
    scale = Scale(1e-4)
    scale(a32)
    assert scale.backward(a32).dtype == np.float32


def test_crop_errors():
    x = np.zeros((1, 2, 5, 6))
    with pytest.raises(ValueError, match=r"offset \(2, 3\) \+ size \(4, 3\) exceeds the input's spatial size \(5, 6\)"):
        Crop((2, 3))(x, (4, 3))
    with pytest.raises(ValueError, match=r"offset \(0, 4\) \+ size \(5, 3\)"):
        Crop((0, 4))(x, np.zeros((1, 1, 5, 3)))
    with pytest.raises(ValueError, match=r"offset must be >= 0, got -1"):
        Crop(-1)
    with pytest.raises(ValueError, match=r"ndim=3"):
        Crop(0)(np.zeros((2, 5, 6)), (2, 2))
    crop = Crop(1)
    with pytest.raises(RuntimeError, match=r"Crop: backward called before forward"):
        crop.backward(np.zeros((1, 2, 3, 3)))
    crop(x, (3, 3))
    with pytest.raises(ValueError, match=r"upstream gradient .*\(1, 3, 3, 3\)"):
        crop.backward(np.zeros((1, 3, 3, 3)))
    with pytest.raises(ValueError, match=r"upstream gradient .*\(1, 2, 2, 3\)"):
        crop.backward(np.zeros((1, 2, 2, 3)))


def test_add_concat_scale_errors():
    with pytest.raises(ValueError, match=r"Add: shapes must match, got \(1, 2, 3, 3\) and \(1, 2, 3, 4\)"):
        Add()(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 4)))
    with pytest.raises(RuntimeError, match=r"Add: backward called before forward"):
        Add().backward(np.zeros((1, 1, 1, 1)))
    add = Add()
    add(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 3, 3)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 2, 3, 4\)"):
        add.backward(np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"input 1 has shape \(1, 2, 4, 3\)"):
        Concat()(np.zeros((1, 1, 3, 3)), np.zeros((1, 2, 4, 3)))
    with pytest.raises(ValueError, match=r"at least two inputs, got 1"):
        Concat()(np.zeros((1, 1, 3, 3)))
    with pytest.raises(RuntimeError, match=r"Concat: backward called before forward"):
        Concat().backward(np.zeros((1, 1, 1, 1)))
    with pytest.raises(RuntimeError, match=r"Scale: backward called before forward"):
        Scale(2.0).backward(np.zeros((1, 1, 1, 1)))
    scale = Scale(2.0)
    scale(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ValueError, match=r"upstream gradient has shape \(1, 1, 2, 3\)"):
        scale.backward(np.zeros((1, 1, 2, 3)))
