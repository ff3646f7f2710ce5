"""SoftmaxCrossEntropy and SigmoidBinaryCrossEntropy: gradients, the per-pixel
reference, edge cases (all pixels ignored, huge logits), PyTorch's weighting
convention, dtypes and errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from minifcn import reference as ref
from minifcn.backend import to_numpy
from minifcn.gradcheck import check_layer
from minifcn.layers import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

WEIGHTS = [0.2, 1.0, 3.0, 0.5]

SOFTMAX_CASES = {  # id: (constructor kwargs, shape, fraction of ignored pixels)
    "mean-n2-c4-3x5": (dict(), (2, 4, 3, 5), 0.0),
    "sum-n2-c4-3x5": (dict(reduction="sum"), (2, 4, 3, 5), 0.0),
    "mean-ignore-n2-c4-3x5": (dict(), (2, 4, 3, 5), 0.3),
    "sum-ignore-n1-c3-4x4": (dict(reduction="sum"), (1, 3, 4, 4), 0.3),
    "mean-weight-n2-c4-3x5": (dict(class_weight=WEIGHTS), (2, 4, 3, 5), 0.0),
    "mean-weight-ignore-n2-c4-3x5": (dict(class_weight=WEIGHTS), (2, 4, 3, 5), 0.3),
    "sum-weight-ignore-n1-c4-2x3": (dict(reduction="sum", class_weight=WEIGHTS), (1, 4, 2, 3), 0.3),
    "mean-ignore-none-n3-c2-2x2": (dict(ignore_index=None), (3, 2, 2, 2), 0.0),
    "mean-ignore-minus1-n1-c5-3x3": (dict(ignore_index=-1), (1, 5, 3, 3), 0.4),
    "mean-all-ignored-n1-c3-2x2": (dict(), (1, 3, 2, 2), 1.0),
}


def make_softmax_case(case, rng):
    kwargs, shape, ignored = SOFTMAX_CASES[case]
    n, c, h, w = shape
    logits = rng.standard_normal(shape) * 2
    labels = rng.integers(0, c, size=(n, h, w))
    ignore = kwargs.get("ignore_index", 255)
    if ignore is not None:
        labels[rng.random((n, h, w)) < ignored] = ignore
    return SoftmaxCrossEntropy(**kwargs), logits, labels, kwargs


def _ref_kwargs(kwargs):
    return {"ignore_index": kwargs.get("ignore_index", 255), "reduction": kwargs.get("reduction", "mean"),
            "class_weight": kwargs.get("class_weight")}


@pytest.mark.parametrize("case", SOFTMAX_CASES)
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_softmax_ce_gradcheck(case, mode, xp, rng):
    layer, logits, labels, _ = make_softmax_case(case, rng)
    report = check_layer(layer, xp.asarray(logits), xp.asarray(labels), mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", SOFTMAX_CASES)
def test_softmax_ce_matches_reference(case, xp, rng, rel_err):
    layer, logits, labels, kwargs = make_softmax_case(case, rng)
    loss = layer(xp.asarray(logits), xp.asarray(labels))
    assert isinstance(loss, float)
    want = ref.softmax_cross_entropy(logits, labels, **_ref_kwargs(kwargs))
    assert abs(loss - want) <= 1e-12 * max(abs(want), 1.0)
    grad = layer.backward()
    want_grad = ref.softmax_cross_entropy_backward(logits, labels, **_ref_kwargs(kwargs))
    if np.abs(want_grad).max() == 0:
        assert float(abs(grad).max()) == 0.0
    else:
        assert rel_err(grad, want_grad) < 1e-12
    np.testing.assert_allclose(to_numpy(layer.backward(scale=2.5)), 2.5 * to_numpy(grad), rtol=1e-14)


def test_softmax_ce_matches_direct_log_softmax(rng):
    """-log(exp(z_y) / sum_c exp(z_c)), averaged, for moderate logits."""
    logits = rng.standard_normal((2, 5, 3, 4))
    labels = rng.integers(0, 5, size=(2, 3, 4))
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    picked = np.take_along_axis(p, labels[:, None], axis=1)[:, 0]
    layer = SoftmaxCrossEntropy()
    np.testing.assert_allclose(layer(logits, labels), -np.log(picked).mean(), rtol=1e-13)
    onehot = np.moveaxis(np.eye(5)[labels], -1, 1)
    np.testing.assert_allclose(layer.backward(), (p - onehot) / labels.size, rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(SoftmaxCrossEntropy(reduction="sum")(logits, labels), -np.log(picked).sum(), rtol=1e-13)


def test_softmax_ce_hand_worked():
    """Two classes, logits (0, log 3) at one pixel: softmax = (1/4, 3/4).
    Label 1: loss = -log(3/4); gradient = (1/4 - 0, 3/4 - 1) = (0.25, -0.25)."""
    logits = np.array([0.0, np.log(3.0)]).reshape(1, 2, 1, 1)
    layer = SoftmaxCrossEntropy()
    np.testing.assert_allclose(layer(logits, np.array([[[1]]])), -np.log(0.75), rtol=1e-15)
    np.testing.assert_allclose(layer.backward()[:, :, 0, 0], [[0.25, -0.25]], rtol=1e-15)


def test_all_pixels_ignored_gives_zero_loss_and_gradient(xp):
    logits = xp.asarray(np.random.default_rng(0).standard_normal((2, 3, 2, 2)))
    labels = xp.full((2, 2, 2), 255, dtype=xp.int64)
    for layer in (SoftmaxCrossEntropy(), SoftmaxCrossEntropy(class_weight=[1.0, 2.0, 3.0])):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no 0/0 RuntimeWarning
            loss = layer(logits, labels)
            grad = layer.backward()
        assert loss == 0.0
        assert float(abs(grad).max()) == 0.0 and bool(xp.isfinite(grad).all())
    bce = SigmoidBinaryCrossEntropy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bce(logits[:, :1], labels) == 0.0
        assert float(abs(bce.backward()).max()) == 0.0


def test_softmax_ce_is_stable_for_huge_logits(rng):
    """Softmax is shift-invariant: adding 1e4 to every logit of a pixel changes
    nothing, and logits of size 1e4 give finite results (no exp overflow)."""
    logits = rng.standard_normal((2, 4, 3, 3))
    labels = rng.integers(0, 4, size=(2, 3, 3))
    layer = SoftmaxCrossEntropy()
    base, base_grad = layer(logits, labels), layer.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = layer(logits + 1e4, labels)
        shifted_grad = layer.backward()
        huge = layer(logits * 1e4, labels)
        huge_grad = layer.backward()
    np.testing.assert_allclose(shifted, base, rtol=1e-9)
    np.testing.assert_allclose(shifted_grad, base_grad, rtol=1e-8, atol=1e-12)
    assert np.isfinite(huge) and np.isfinite(huge_grad).all()
    np.testing.assert_allclose(huge, ref.softmax_cross_entropy(logits * 1e4, labels), rtol=1e-12)
    # float32 too: 1e4 logits in float32 stay finite.
    loss32 = layer((logits * 1e4).astype(np.float32), labels)
    assert np.isfinite(loss32) and np.isfinite(layer.backward()).all()


def test_class_weight_follows_torch_convention():
    """Weighted mean = sum_p w[y_p] * loss_p / sum_p w[y_p] over counted pixels.
    Pixels: labels (0, 1, 1, 255) with all-zero logits (loss_p = log 3 each),
    weights (2, 0.5, 1): numerator 2 log3 + 0.5 log3 + 0.5 log3 = 3 log 3,
    denominator 2 + 0.5 + 0.5 = 3, so the loss is log 3 (the ignored pixel and the
    unused class 2 count for nothing)."""
    logits = np.zeros((1, 3, 1, 4))
    labels = np.array([[[0, 1, 1, 255]]])
    layer = SoftmaxCrossEntropy(class_weight=[2.0, 0.5, 1.0])
    np.testing.assert_allclose(layer(logits, labels), np.log(3.0), rtol=1e-15)
    # Gradient of pixel 0: w * (softmax - onehot) / 3 = 2 * (1/3 - 1, 1/3, 1/3) / 3.
    np.testing.assert_allclose(layer.backward()[0, :, 0, 0], 2 * np.array([-2 / 3, 1 / 3, 1 / 3]) / 3, rtol=1e-14)
    np.testing.assert_allclose(layer.backward()[0, :, 0, 3], 0.0)
    summed = SoftmaxCrossEntropy(class_weight=[2.0, 0.5, 1.0], reduction="sum")
    np.testing.assert_allclose(summed(logits, labels), 3 * np.log(3.0), rtol=1e-15)


@pytest.mark.torch
@pytest.mark.parametrize("case", ["mean-n2-c4-3x5", "sum-ignore-n1-c3-4x4", "mean-weight-ignore-n2-c4-3x5",
                                  "sum-weight-ignore-n1-c4-2x3"])
def test_softmax_ce_matches_torch(case, rng):
    torch = pytest.importorskip("torch")
    layer, logits, labels, kwargs = make_softmax_case(case, rng)
    tz = torch.tensor(logits, requires_grad=True)
    weight = None if "class_weight" not in kwargs else torch.tensor(kwargs["class_weight"], dtype=torch.float64)
    tloss = torch.nn.functional.cross_entropy(tz, torch.tensor(labels), weight=weight, ignore_index=255,
                                              reduction=kwargs.get("reduction", "mean"))
    tloss.backward()
    np.testing.assert_allclose(layer(logits, labels), tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(layer.backward(), tz.grad.numpy(), rtol=1e-10, atol=1e-15)


BCE_CASES = {
    "mean-n2-3x4": (dict(), (2, 1, 3, 4), 0.0),
    "sum-n1-4x4": (dict(reduction="sum"), (1, 1, 4, 4), 0.0),
    "mean-ignore-n2-3x5": (dict(), (2, 1, 3, 5), 0.3),
    "sum-ignore-n3-2x2": (dict(reduction="sum"), (3, 1, 2, 2), 0.3),
}


def make_bce_case(case, rng):
    kwargs, shape, ignored = BCE_CASES[case]
    logits = rng.standard_normal(shape) * 2
    targets = rng.integers(0, 2, size=(shape[0], *shape[2:]))
    targets[rng.random(targets.shape) < ignored] = 255
    return SigmoidBinaryCrossEntropy(**kwargs), logits, targets, kwargs


@pytest.mark.parametrize("case", BCE_CASES)
@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_sigmoid_bce_gradcheck(case, mode, xp, rng):
    layer, logits, targets, _ = make_bce_case(case, rng)
    report = check_layer(layer, xp.asarray(logits), xp.asarray(targets), mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)


@pytest.mark.parametrize("case", BCE_CASES)
def test_sigmoid_bce_matches_reference(case, xp, rng, rel_err):
    layer, logits, targets, kwargs = make_bce_case(case, rng)
    loss = layer(xp.asarray(logits), xp.asarray(targets))
    want = ref.sigmoid_bce(logits, targets, reduction=kwargs.get("reduction", "mean"))
    assert abs(loss - want) <= 1e-12 * abs(want)
    assert rel_err(layer.backward(), ref.sigmoid_bce_backward(logits, targets, reduction=kwargs.get("reduction", "mean"))) < 1e-12
    # (N, 1, H, W) targets are accepted too.
    assert layer(xp.asarray(logits), xp.asarray(targets[:, None])) == loss


def test_sigmoid_bce_is_stable_for_huge_logits():
    """z = +-1e4: the loss of a confident right answer is 0, of a wrong one |z|;
    the gradient is sigmoid(z) - t, i.e. 0 or +-1, without overflow warnings."""
    logits = np.array([1e4, -1e4, 1e4, -1e4]).reshape(1, 1, 1, 4)
    targets = np.array([[[1, 0, 0, 1]]])
    layer = SigmoidBinaryCrossEntropy(reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = layer(logits, targets)
        grad = layer.backward()
    assert loss == 2e4
    np.testing.assert_array_equal(grad[0, 0, 0], [0.0, 0.0, 1.0, -1.0])


@pytest.mark.torch
def test_sigmoid_bce_matches_torch(rng):
    torch = pytest.importorskip("torch")
    layer, logits, targets, _ = make_bce_case("mean-n2-3x4", rng)
    tz = torch.tensor(logits, requires_grad=True)
    tloss = torch.nn.functional.binary_cross_entropy_with_logits(tz, torch.tensor(targets[:, None], dtype=torch.float64))
    tloss.backward()
    np.testing.assert_allclose(layer(logits, targets), tloss.item(), rtol=1e-12)
    np.testing.assert_allclose(layer.backward(), tz.grad.numpy(), rtol=1e-10)


def test_float32_stays_float32(xp, rng):
    for layer, logits, labels, _ in (make_softmax_case("mean-weight-ignore-n2-c4-3x5", rng),
                                     make_bce_case("mean-ignore-n2-3x5", rng)):
        loss64 = layer(xp.asarray(logits), xp.asarray(labels))
        grad64 = layer.backward()
        loss32 = layer(xp.asarray(logits.astype(np.float32)), xp.asarray(labels))
        grad32 = layer.backward()
        assert grad32.dtype == np.float32
        assert abs(loss32 - loss64) <= 1e-4 * abs(loss64)
        assert float(abs(grad32 - grad64).max()) <= 1e-4 * float(abs(grad64).max())


def test_errors():
    logits = np.zeros((1, 3, 2, 2))
    layer = SoftmaxCrossEntropy()
    with pytest.raises(ValueError, match=r"labels must be an integer array, got float64"):
        layer(logits, np.zeros((1, 2, 2)))
    with pytest.raises(ValueError, match=r"label 7 is out of range for 3 classes"):
        layer(logits, np.array([[[0, 1], [7, 2]]]))
    with pytest.raises(ValueError, match=r"label -1 is out of range for 3 classes"):
        layer(logits, np.array([[[0, 1], [-1, 2]]]))
    with pytest.raises(ValueError, match=r"label 255 is out of range"):
        SoftmaxCrossEntropy(ignore_index=None)(logits, np.array([[[0, 1], [255, 2]]]))
    with pytest.raises(ValueError, match=r"labels must have shape \(N, H, W\) = \(1, 2, 2\), got \(1, 2, 3\)"):
        layer(logits, np.zeros((1, 2, 3), np.int64))
    with pytest.raises(ValueError, match=r"ndim=3"):
        layer(np.zeros((3, 2, 2)), np.zeros((1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"class_weight must have shape \(3,\), got \(2,\)"):
        SoftmaxCrossEntropy(class_weight=[1.0, 2.0])(logits, np.zeros((1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'avg'"):
        SoftmaxCrossEntropy(reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'none'"):
        SigmoidBinaryCrossEntropy(reduction="none")
    with pytest.raises(RuntimeError, match=r"SoftmaxCrossEntropy: backward called before forward"):
        SoftmaxCrossEntropy().backward()
    with pytest.raises(RuntimeError, match=r"SigmoidBinaryCrossEntropy: backward called before forward"):
        SigmoidBinaryCrossEntropy().backward()
    bce = SigmoidBinaryCrossEntropy()
    with pytest.raises(ValueError, match=r"expected 1 input channels, got 3"):
        bce(logits, np.zeros((1, 2, 2), np.int64))
    with pytest.raises(ValueError, match=r"label 2 is out of range for 2 classes"):
        bce(logits[:, :1], np.array([[[0, 1], [2, 1]]]))
    with pytest.raises(ValueError, match=r"labels must be an integer array, got complex128"):
        bce(logits[:, :1], np.zeros((1, 2, 2), np.complex128))
    with pytest.raises(ValueError, match=r"float targets must lie in \[0, 1\].*got 2.0"):  # float: soft targets
        bce(logits[:, :1], np.array([[[0, 1], [2, 0.5]]], np.float32))


@pytest.mark.parametrize("weight", [[1.0, -0.5, 2.0], [1.0, float("nan"), 1.0], [float("inf"), 1.0, 1.0]])
def test_class_weight_must_be_finite_and_non_negative(weight):
    bad = next(w for w in weight if not (np.isfinite(w) and w >= 0))
    with pytest.raises(ValueError, match=rf"class_weight must be finite and >= 0, got {bad} for class {weight.index(bad) if bad == bad else 1}"):
        SoftmaxCrossEntropy(class_weight=weight)


def test_bce_takes_soft_targets_like_pytorch(rng):
    """Float targets in [0, 1]: loss = mean(max(z, 0) - z t + log(1 + exp(-|z|))), gradient (s(z) - t) / count,
    checked against the formula in float64 and by central differences; 255 is still ignored."""
    z = rng.standard_normal((2, 1, 3, 4))
    t = rng.random((2, 3, 4))
    t[0, 0, 0] = 0.0
    t[1, 2, 3] = 1.0
    t[0, 1, 1] = 255.0
    loss = SigmoidBinaryCrossEntropy()
    counted = t != 255
    zz, tt = z[:, 0][counted], t[counted]
    expected = np.mean(np.maximum(zz, 0) - zz * tt + np.log1p(np.exp(-np.abs(zz))))
    assert loss(z, t) == pytest.approx(expected, rel=1e-12)
    grad = loss.backward()
    want = np.where(counted, 1 / (1 + np.exp(-z[:, 0])) - np.where(counted, t, 0), 0) / counted.sum()
    np.testing.assert_allclose(grad[:, 0], want, rtol=1e-12, atol=1e-15)
    assert check_layer(SigmoidBinaryCrossEntropy(), z, t).passed
    # hard float targets give the integer targets' loss
    hard = (t > 0.5).astype(np.int64)
    hard[0, 1, 1] = 255
    assert loss(z, np.where(t == 255, 255.0, (t > 0.5).astype(float))) == pytest.approx(loss(z, hard), rel=1e-12)


@pytest.mark.parametrize("value", [1.5, -0.25, float("nan")])
def test_bce_refuses_float_targets_outside_0_1_naming_the_value(value):
    t = np.full((1, 2, 2), 0.5)
    t[0, 1, 0] = value
    with pytest.raises(ValueError, match=rf"float targets must lie in \[0, 1\].*got {value} at 1 pixel"):
        SigmoidBinaryCrossEntropy()(np.zeros((1, 1, 2, 2)), t)


def put_along_axis_gradient(layer):
    """The softmax gradient as it was first written: copy the probabilities, subtract 1 at each
    pixel's label by gather and scatter (``put_along_axis``: CuPy has it only from v14), scale."""
    prob, safe, weight, norm = layer._cache
    grad = prob.copy()
    np.put_along_axis(grad, safe[:, None], np.take_along_axis(grad, safe[:, None], axis=1) - 1, axis=1)
    grad *= (weight * prob.dtype.type(norm))[:, None]
    return grad


@pytest.mark.parametrize("case", SOFTMAX_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_elementwise_softmax_gradient_equals_gather_scatter(case, dtype, rng):
    """prob - onehot as one element-wise comparison gives the gather/scatter result bit for bit."""
    layer, logits, labels, _ = make_softmax_case(case, rng)
    layer(logits.astype(dtype), labels)
    grad = layer.backward()
    assert grad.dtype == dtype
    np.testing.assert_array_equal(grad, put_along_axis_gradient(layer))


@pytest.mark.parametrize("make", [lambda rng: make_softmax_case("mean-weight-ignore-n2-c4-3x5", rng),
                                  lambda rng: make_bce_case("mean-ignore-n2-3x5", rng)], ids=["softmax", "bce"])
def test_one_transfer_to_the_host_per_forward(make, rng, monkeypatch):
    """The loss, its normaliser and the number of bad labels come back together: one device sync a
    call on the GPU. A bad label is still reported, with its value, after that transfer."""
    import minifcn.layers.loss as loss_module  # noqa: PLC0415

    transfers = []
    real = loss_module.to_numpy
    monkeypatch.setattr(loss_module, "to_numpy", lambda a: transfers.append(a.shape) or real(a))
    layer, logits, labels, _ = make(rng)
    layer(logits, labels)
    assert transfers == [(3,)]
    labels = labels.copy()
    labels.flat[3] = 9
    with pytest.raises(ValueError, match="label 9 is out of range"):
        layer(logits, labels)


def _soft_bce_case(rng):
    logits = rng.standard_normal((2, 1, 3, 4))
    targets = rng.random((2, 3, 4))
    targets[0, 0] = 255.0  # ignored
    return SigmoidBinaryCrossEntropy(), logits, targets, {}


COUNT_CASES = {**{f"softmax-{case}": (lambda rng, case=case: make_softmax_case(case, rng)) for case in SOFTMAX_CASES},
               **{f"bce-{case}": (lambda rng, case=case: make_bce_case(case, rng)) for case in BCE_CASES},
               "bce-soft-targets": _soft_bce_case}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", COUNT_CASES)
def test_count_of_the_labels_is_the_count_forward_keeps(case, dtype, xp, rng):
    """``count_of`` (labels, the logits' shape and dtype) gives forward's ``count`` bit for bit: ignored
    pixels, class weights, soft targets, float32 and float64 (training sums it over the ranks before the
    step's forward pass)."""
    layer, logits, labels, _ = COUNT_CASES[case](rng)
    logits, labels = xp.asarray(logits.astype(dtype)), xp.asarray(labels)
    layer(logits, labels)
    count = layer.count_of(labels, logits.shape, dtype)
    assert type(count) is float and count == layer.count
    if SOFTMAX_CASES.get(case.removeprefix("softmax-"), [{}])[0].get("class_weight"):  # weights, not pixels
        assert count != float((to_numpy(labels) < logits.shape[1]).sum())


def test_count_of_refuses_what_forward_refuses():
    labels = np.array([[[0, 1], [2, 7]]])
    with pytest.raises(ValueError, match="label 7 is out of range for 3 classes"):
        SoftmaxCrossEntropy().count_of(labels, (1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"labels must have shape \(N, H, W\) = \(1, 2, 3\)"):
        SoftmaxCrossEntropy().count_of(labels, (1, 3, 2, 3), np.float32)
    with pytest.raises(ValueError, match=r"logits_shape must be \(N, C, H, W\), got \(3, 2, 2\)"):
        SoftmaxCrossEntropy().count_of(labels, (3, 2, 2), np.float32)
    with pytest.raises(ValueError, match="float targets must lie in"):
        SigmoidBinaryCrossEntropy().count_of(np.array([[[0.5, 1.5]]]), (1, 1, 1, 2), np.float32)
