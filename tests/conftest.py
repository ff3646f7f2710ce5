"""Shared fixtures: the array-module and device switches, tie-free random inputs, and whole-model gradients.

``xp`` runs a test once on NumPy and once on CuPy, ``device`` once with
``"cpu"`` and once with ``"gpu"`` (the GPU run is marked ``gpu`` and skipped
where no GPU is visible), so layer, model, optimiser, metric, checkpoint and
training tests are written once. Results are compared through ``to_numpy``:
CuPy arrays refuse NumPy's implicit conversion.
"""
from __future__ import annotations

import numpy as np
import pytest

from minifcn.backend import gpu_available, to_numpy

_NO_GPU = "CuPy with a visible CUDA device is not available (minifcn.backend.gpu_available() is False)"


@pytest.fixture(params=[
    pytest.param("numpy", id="numpy"),
    pytest.param("cupy", id="cupy", marks=[pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason=_NO_GPU)]),
])
def xp(request):
    """The array module a test runs on: ``numpy``, or ``cupy`` when a GPU is there."""
    if request.param == "numpy":
        return np
    import cupy  # noqa: PLC0415 (only reached when gpu_available())

    return cupy


@pytest.fixture(params=[
    pytest.param("cpu", id="cpu"),
    pytest.param("gpu", id="gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not gpu_available(), reason=_NO_GPU)]),
])
def device(request):
    """The device a test runs on: ``"cpu"``, or ``"gpu"`` when CuPy sees one (use with ``to_device``, ``model.to``)."""
    return request.param


def tie_free_array(shape, rng, step=2e-3, margin=0.1):
    """Distinct values in random order: consecutive values differ by ``step`` (> 1e-3,
    so max-pool windows have a clear winner under a 1e-5 finite-difference
    step) and every value is at least ``margin`` away from 0 (no ReLU kink)."""
    size = int(np.prod(shape))
    v = (rng.permutation(size) - size // 2 + 0.5) * step
    v = v + np.sign(v) * margin
    return v.reshape(shape)


def max_rel_err(actual, expected) -> float:
    """``max |actual - expected| / max |expected|``: one tensor-wide relative error."""
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    scale = max(float(np.abs(e).max(initial=0.0)), 1e-300)
    return float(np.abs(a - e).max(initial=0.0)) / scale


@pytest.fixture
def rng():
    """A fresh, seeded NumPy Generator per test."""
    return np.random.default_rng(1234)


@pytest.fixture
def tie_free():
    """``tie_free(shape, rng)``: see :func:`tie_free_array`."""
    return tie_free_array


@pytest.fixture
def rel_err():
    """``rel_err(actual, expected)``: see :func:`max_rel_err`."""
    return max_rel_err


def model_gradients(model, x, dy):
    """One forward and backward of ``model``: (dx, {name: copy of the gradient} of every trainable parameter)."""
    model.zero_grad()
    model(x)
    dx = model.backward(dy)
    return dx, {n: p.grad.copy() for n, p in model.named_parameters() if p.trainable}


def check_batch_gradient_is_the_sum(model, x, dy):
    """Backward of a batch of two equals the two single-image backwards: dx stacked, parameter gradients added."""
    dx, both = model_gradients(model, x, dy)
    dx0, first = model_gradients(model, x[:1], dy[:1])
    dx1, second = model_gradients(model, x[1:], dy[1:])
    np.testing.assert_allclose(to_numpy(dx), np.concatenate([to_numpy(dx0), to_numpy(dx1)]), rtol=1e-10, atol=1e-12)
    for n in both:
        np.testing.assert_allclose(to_numpy(both[n]), to_numpy(first[n] + second[n]), rtol=1e-9, atol=1e-12, err_msg=n)


@pytest.fixture
def gradients():
    """``gradients(model, x, dy)``: see :func:`model_gradients`."""
    return model_gradients


@pytest.fixture
def batch_gradient_is_the_sum():
    """``batch_gradient_is_the_sum(model, x, dy)``: see :func:`check_batch_gradient_is_the_sum`."""
    return check_batch_gradient_is_the_sum
