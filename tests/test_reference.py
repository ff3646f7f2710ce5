"""The oracle checked on its own: every reference backward against finite
differences of the reference forward, and the reference gather (conv2d) against
the independently written reference scatter (conv_transpose2d)."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn import reference as ref


def numeric_grad(f, t, eps=1e-6):
    """d f / d t by central differences, one element at a time (f returns a float)."""
    grad = np.zeros_like(t)
    for idx in np.ndindex(t.shape):
        old = t[idx]
        t[idx] = old + eps
        plus = f()
        t[idx] = old - eps
        minus = f()
        t[idx] = old
        grad[idx] = (plus - minus) / (2 * eps)
    return grad


def close(a, b, tol=1e-7):
    return np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-3)


@pytest.mark.parametrize("k,s,p,d", [((3, 2), (2, 1), (1, 0), (1, 2)), ((2, 2), (1, 1), (2, 1), (2, 1))],
                         ids=["k3x2-s2x1-p1x0-d1x2", "k2-s1-p2x1-d2x1"])
def test_conv2d_backward_is_the_derivative(k, s, p, d, rng):
    x = rng.standard_normal((2, 2, 4, 5))
    w = rng.standard_normal((3, 2, *k))
    b = rng.standard_normal(3)
    g = rng.standard_normal(ref.conv2d(x, w, b, s, p, d).shape)
    loss = lambda: float((ref.conv2d(x, w, b, s, p, d) * g).sum())  # noqa: E731
    dx, dw, db = ref.conv2d_backward(x, w, g, s, p, d)
    assert close(dx, numeric_grad(loss, x)) and close(dw, numeric_grad(loss, w)) and close(db, numeric_grad(loss, b))


@pytest.mark.parametrize("k,s,p,op,d", [((3, 2), (2, 2), (1, 0), (1, 1), (1, 2)), (2, 1, 0, 2, 3)],
                         ids=["k3x2-s2-p1x0-op1-d1x2", "k2-s1-p0-op2-d3"])
def test_conv_transpose2d_backward_is_the_derivative(k, s, p, op, d, rng):
    x = rng.standard_normal((2, 2, 3, 3))
    w = rng.standard_normal((2, 3, *np.broadcast_to(k, 2)))
    b = rng.standard_normal(3)
    g = rng.standard_normal(ref.conv_transpose2d(x, w, b, s, p, op, d).shape)
    loss = lambda: float((ref.conv_transpose2d(x, w, b, s, p, op, d) * g).sum())  # noqa: E731
    dx, dw, db = ref.conv_transpose2d_backward(x, w, g, s, p, op, d)
    assert close(dx, numeric_grad(loss, x)) and close(dw, numeric_grad(loss, w)) and close(db, numeric_grad(loss, b))


@pytest.mark.parametrize("k,s,p,d", [(3, 2, 1, 1), ((2, 3), (3, 1), (1, 0), (2, 1)), (1, 1, 0, 1), (4, 3, 2, 2)])
def test_reference_gather_and_scatter_are_adjoint(k, s, p, d, rng):
    """conv2d (gather) and conv_transpose2d (scatter) are written separately; with the
    same weight they must satisfy <conv(x), y> = <x, conv_t(y)>."""
    x = rng.standard_normal((2, 3, 6, 7))
    w = rng.standard_normal((2, 3, *np.broadcast_to(k, 2)))
    cx = ref.conv2d(x, w, None, s, p, d)
    y = rng.standard_normal(cx.shape)
    (sh, sw), (ph, pw), (dh, dw) = (np.broadcast_to(v, 2) for v in (s, p, d))
    kh, kw = w.shape[2:]
    op = ((6 + 2 * ph - dh * (kh - 1) - 1) % sh, (7 + 2 * pw - dw * (kw - 1) - 1) % sw)
    cty = ref.conv_transpose2d(y, w, None, s, p, op, d)
    assert cty.shape == x.shape
    assert abs((cx * y).sum() - (x * cty).sum()) <= 1e-10 * np.abs(cx * y).sum()


def test_max_pool_backward_is_the_derivative(rng):
    x = rng.permutation(60).reshape(1, 3, 4, 5) * 0.01  # distinct values: differentiable
    for kw in [dict(kernel=2, ceil_mode=True), dict(kernel=(3, 2), stride=(1, 2), padding=1, dilation=1),
               dict(kernel=2, stride=1, dilation=2)]:
        g = rng.standard_normal(ref.max_pool2d(x, **kw).shape)
        loss = lambda: float((ref.max_pool2d(x, **kw) * g).sum())  # noqa: E731
        assert close(ref.max_pool2d_backward(x, g, **kw), numeric_grad(loss, x, eps=1e-4))


@pytest.mark.parametrize("geometry", [dict(scale=2), dict(scale=1.5), dict(out_hw=(5, 2)), dict(scale=(3, 0.5))],
                         ids=["x2", "x1.5", "to5x2", "x3x0.5"])
def test_upsample_backward_is_the_derivative(geometry, rng):
    x = rng.standard_normal((1, 2, 3, 4))
    for forward, backward in ((ref.upsample_nearest, ref.upsample_nearest_backward),
                              (ref.upsample_bilinear, ref.upsample_bilinear_backward)):
        g = rng.standard_normal(forward(x, **geometry).shape)
        loss = lambda: float((forward(x, **geometry) * g).sum())  # noqa: E731
        assert close(backward(x.shape, g, **geometry), numeric_grad(loss, x))


def test_elementwise_and_crop_backwards_are_derivatives(rng):
    x = rng.standard_normal((2, 2, 3, 4))
    x[np.abs(x) < 0.05] = 0.5  # away from the ReLU kink
    g = rng.standard_normal(x.shape)
    assert close(ref.relu_backward(x, g), numeric_grad(lambda: float((ref.relu(x) * g).sum()), x))
    keep = rng.random(x.shape) > 0.4
    assert close(ref.dropout_backward(keep, g, 0.4), numeric_grad(lambda: float((ref.dropout(x, keep, 0.4) * g).sum()), x))
    gc = rng.standard_normal((2, 2, 2, 2))
    assert close(ref.crop_backward(x.shape, gc, (1, 2)),
                 numeric_grad(lambda: float((ref.crop(x, (1, 2), (2, 2)) * gc).sum()), x))


@pytest.mark.parametrize("kwargs", [dict(), dict(reduction="sum"), dict(class_weight=[0.5, 2.0, 1.0])],
                         ids=["mean", "sum", "weighted"])
def test_loss_backwards_are_derivatives(kwargs, rng):
    z = rng.standard_normal((2, 3, 2, 3))
    labels = rng.integers(0, 3, (2, 2, 3))
    labels[0, 0, 0] = 255
    loss = lambda: ref.softmax_cross_entropy(z, labels, **kwargs)  # noqa: E731
    assert close(ref.softmax_cross_entropy_backward(z, labels, **kwargs), numeric_grad(loss, z))
    if "class_weight" not in kwargs:
        z1 = z[:, :1].copy()
        t = labels.copy()
        t[t == 2] = 1
        bce = lambda: ref.sigmoid_bce(z1, t, **kwargs)  # noqa: E731
        assert close(ref.sigmoid_bce_backward(z1, t, **kwargs), numeric_grad(bce, z1))


def test_small_hand_examples():
    # max pool with -inf padding and the first-maximum tie rule
    x = np.array([[[[1.0, 3.0], [3.0, -2.0]]]])
    np.testing.assert_array_equal(ref.max_pool2d(x, 2), [[[[3.0]]]])
    np.testing.assert_array_equal(ref.max_pool2d_backward(x, np.ones((1, 1, 1, 1)), 2), [[[[0, 1], [0, 0]]]])
    np.testing.assert_array_equal(ref.max_pool2d(-np.abs(x), 3, 1, 1), np.full((1, 1, 2, 2), -1.0))
    # bilinear, one row [0, 4] doubled: [0, 1, 3, 4]
    np.testing.assert_array_equal(ref.upsample_bilinear(np.array([[[[0.0, 4.0]]]]), scale=(1, 2)), [[[[0, 1, 3, 4]]]])
    # softmax CE of uniform logits over 4 classes is log 4
    assert ref.softmax_cross_entropy(np.zeros((1, 4, 1, 1)), np.array([[[2]]])) == pytest.approx(np.log(4), rel=1e-15)
    # sigmoid BCE at z = 0 is log 2 for either target
    assert ref.sigmoid_bce(np.zeros((1, 1, 1, 2)), np.array([[[0, 1]]])) == pytest.approx(np.log(2), rel=1e-15)
