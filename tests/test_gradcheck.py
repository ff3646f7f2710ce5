"""The gradient checker itself: it must catch wrong backward passes, name the
worst element, work on user-defined layers and leave the caller's layer alone."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn.gradcheck import check_layer
from minifcn.layers import Conv2d, SoftmaxCrossEntropy
from minifcn.module import Module, Parameter


class Triple(Module):
    """y = 3x with a configurable (possibly wrong) backward."""

    def __init__(self, backward_fn):
        super().__init__()
        self.backward_fn = backward_fn

    def forward(self, x):
        return 3 * x

    def backward(self, dy):
        return self.backward_fn(dy)


class RightMatmul(Module):
    """y = x @ A along the last axis (A square, not symmetric)."""

    def __init__(self, a, transpose_bug=False):
        super().__init__()
        self.a = a
        self.transpose_bug = transpose_bug

    def forward(self, x):
        return x @ self.a

    def backward(self, dy):
        return dy @ (self.a if self.transpose_bug else self.a.T)  # the bug: forgetting the transpose


class ConvForgetsBias(Conv2d):
    def backward(self, dy):
        saved = self.bias.grad.copy()
        dx = super().backward(dy)
        self.bias.grad[...] = saved  # the bug: bias gradient never added
        return dx


class ConvFirstSampleOnly(Conv2d):
    def backward(self, dy):
        dx = super().backward(dy)
        self.bias.grad[...] = dy[0].sum(axis=(1, 2))  # the bug: bias gradient not summed over the batch
        return dx


class LeakyReLU(Module):
    """A user-written layer: y = x if x > 0 else slope * x."""

    def __init__(self, slope=0.1, backward_slope=None):
        super().__init__()
        self.slope = slope
        self.backward_slope = slope if backward_slope is None else backward_slope  # != slope: a bug

    def forward(self, x):
        self.mask = x > 0
        return np.where(self.mask, x, self.slope * x)

    def backward(self, dy):
        return np.where(self.mask, dy, self.backward_slope * dy)


class PReLU(Module):
    """A user-written layer with a learnable per-channel slope a: y = max(x, 0) + a * min(x, 0)."""

    def __init__(self, channels):
        super().__init__()
        self.a = Parameter(np.full(channels, 0.25))

    def forward(self, x):
        self.x = x
        return np.maximum(x, 0) + self.a.data.reshape(1, -1, 1, 1) * np.minimum(x, 0)

    def backward(self, dy):
        self.a.grad += (dy * np.minimum(self.x, 0)).sum(axis=(0, 2, 3))
        return np.where(self.x > 0, dy, self.a.data.reshape(1, -1, 1, 1) * dy)


@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_detects_a_backward_returning_2dy(mode, rng):
    x = rng.standard_normal((2, 3, 4, 4))
    good = check_layer(Triple(lambda dy: 3 * dy), x, mode=mode)
    bad = check_layer(Triple(lambda dy: 2 * dy), x, mode=mode)
    assert good.passed and good.max_rel_err < 1e-8
    assert not bad.passed and bad.max_rel_err > 0.3  # |3 - 2| / 3
    if mode == "elementwise":
        assert bad.tensors[0].worst_index is not None and len(bad.tensors[0].worst_index) == 4


def test_elementwise_names_the_wrong_element(rng):
    def almost(dy):
        dx = 3 * dy
        dx[1, 2, 0, 3] *= 1.5  # wrong at exactly one element
        return dx

    report = check_layer(Triple(almost), rng.standard_normal((2, 3, 2, 4)), mode="elementwise")
    assert not report.passed
    assert tuple(int(i) for i in report.tensors[0].worst_index) == (1, 2, 0, 3)
    assert "(1, 2, 0, 3)" in str(report)


@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_detects_a_missing_transpose(mode, rng):
    a = rng.standard_normal((4, 4))
    x = rng.standard_normal((2, 3, 5, 4))
    assert check_layer(RightMatmul(a), x, mode=mode).passed
    assert not check_layer(RightMatmul(a, transpose_bug=True), x, mode=mode).passed


@pytest.mark.parametrize("mode", ["random", "elementwise"])
@pytest.mark.parametrize("cls", [ConvForgetsBias, ConvFirstSampleOnly])
def test_detects_a_wrong_bias_gradient_and_names_it(cls, mode, rng):
    layer = cls(2, 3, 3, padding=1, rng=0)
    report = check_layer(layer, rng.standard_normal((2, 2, 4, 5)), mode=mode)
    status = {t.name: t.passed for t in report.tensors}
    assert status == {"input": True, "weight": True, "bias": False}, str(report)
    assert not report.passed


def test_detects_a_wrong_loss_gradient(rng):
    class NoNorm(SoftmaxCrossEntropy):
        def backward(self, scale=1.0):  # the bug: forgets to divide by the pixel count
            return super().backward(scale) / self._cache[3]

    logits, labels = rng.standard_normal((1, 3, 2, 2)), rng.integers(0, 3, (1, 2, 2))
    assert check_layer(SoftmaxCrossEntropy(), logits, labels).passed
    assert not check_layer(NoNorm(), logits, labels).passed


@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_user_defined_layers(mode, rng, tie_free):
    x = tie_free((2, 3, 3, 4), rng)
    report = check_layer(LeakyReLU(0.1), x, mode=mode)
    assert report.passed and report.max_rel_err < 1e-6, str(report)
    report = check_layer(PReLU(3), x, mode=mode)
    assert report.passed and [t.name for t in report.tensors] == ["input", "a"], str(report)
    # A wrong slope in the user's backward is caught.
    assert not check_layer(LeakyReLU(0.1, backward_slope=0.2), x, mode=mode).passed


def test_does_not_modify_the_callers_layer_or_inputs(rng):
    layer = Conv2d(2, 3, 3, rng=0)  # float32
    weight = layer.weight.data.copy()
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    x_before = x.copy()
    x64 = x.astype(np.float64)
    check_layer(layer, x, mode="elementwise")
    check_layer(layer, x64, mode="random")
    assert layer.weight.data.dtype == layer.bias.data.dtype == np.float32
    assert layer.weight.grad.dtype == np.float32 and not layer.weight.grad.any() and not layer.bias.grad.any()
    np.testing.assert_array_equal(layer.weight.data, weight)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(x64, x_before.astype(np.float64))
    assert layer._cache is None
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 3, 3, 3), np.float32))


def test_report_string_is_a_table(rng):
    report = check_layer(Conv2d(1, 2, 2, rng=0), rng.standard_normal((1, 1, 3, 3)), mode="elementwise",
                         name="conv")
    text = str(report)
    lines = text.splitlines()
    assert lines[0].startswith("conv: gradient check (elementwise, tol 1e-06)")
    assert all(h in lines[1] for h in ("tensor", "shape", "max abs err", "max rel err", "worst index", "result"))
    assert [line.split()[0] for line in lines[2:]] == ["input", "weight", "bias"]
    assert all(line.rstrip().endswith("ok") for line in lines[2:])
    assert "(2, 1, 2, 2)" in text  # the weight's shape
    bad = str(check_layer(Triple(lambda dy: dy), rng.standard_normal((1, 1, 2, 2))))
    assert "FAIL" in bad


def test_wrt_and_mode_arguments(rng):
    x = rng.standard_normal((1, 2, 4, 4))
    report = check_layer(Conv2d(2, 2, 3, rng=0), x, wrt=["weight"])
    assert [t.name for t in report.tensors] == ["weight"]
    with pytest.raises(ValueError, match=r"mode must be 'random' or 'elementwise', got 'bogus'"):
        check_layer(Conv2d(2, 2, 3), x, mode="bogus")


def test_tolerance_is_respected(rng):
    """A 1e-4 relative error passes at tol=1e-3 and fails at the default 1e-6."""
    x = rng.standard_normal((1, 1, 3, 3))
    slightly = Triple(lambda dy: 3 * (1 + 1e-4) * dy)
    assert not check_layer(slightly, x).passed
    assert check_layer(slightly, x, tol=1e-3).passed


def test_frozen_parameters_are_not_checked(rng):
    """FCN's fixed bilinear upsampling: a non-trainable weight gets no gradient by
    design, so the checker leaves it out instead of failing it."""
    from minifcn.layers import ConvTranspose2d, bilinear_kernel  # noqa: PLC0415

    layer = ConvTranspose2d(2, 2, 4, stride=2, padding=1, rng=0)
    layer.weight.data[...] = bilinear_kernel(2, 2, 4)
    layer.weight.trainable = False
    report = check_layer(layer, rng.standard_normal((1, 2, 3, 3)))
    assert report.passed and [t.name for t in report.tensors] == ["input", "bias"], str(report)


@pytest.mark.parametrize("mode", ["random", "elementwise"])
def test_run_suite_passes_for_every_layer(mode):
    from minifcn.gradcheck import layer_suite, run_suite  # noqa: PLC0415

    rows, passed = run_suite(mode)
    assert passed, "\n".join(map(str, rows))
    assert {r[0] for r in rows} == {name for name, _, _ in layer_suite()}
    assert all(r[3] < 1e-6 and r[4] == "ok" for r in rows)
