"""The backend switch: array modules, MINIFCN_DEVICE, copies, and no CuPy import."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from minifcn import backend
from minifcn.backend import (check_device, default_device, device_of, get_array_module, module_for_device, to_device,
                             to_numpy)
from minifcn.layers import Conv2d


@pytest.fixture
def no_cupy(monkeypatch):
    """Pretend CuPy is missing, whatever this machine has."""
    monkeypatch.setattr(backend, "_cupy", None)
    monkeypatch.setattr(backend, "_cupy_checked", True)


def test_get_array_module_is_numpy_for_host_values():
    assert get_array_module(np.zeros(3)) is np
    assert get_array_module(None) is np
    assert get_array_module(1.5) is np
    assert get_array_module(3) is np
    assert get_array_module() is np
    assert get_array_module(None, np.ones(2), 2.0) is np
    assert get_array_module(np.float32(1.0)) is np


def test_get_array_module_finds_cupy(xp):
    a = xp.zeros(3)
    assert get_array_module(a) is xp
    assert get_array_module(None, np.zeros(1), a) is xp


@pytest.mark.parametrize("value,expected", [("cpu", "cpu"), (" CPU ", "cpu"), ("", "cpu"), ("Cpu", "cpu")])
def test_minifcn_device_parsing(monkeypatch, value, expected):
    monkeypatch.setenv("MINIFCN_DEVICE", value)
    assert default_device() == expected
    assert check_device(None) == expected


def test_minifcn_device_unset_is_cpu(monkeypatch):
    monkeypatch.delenv("MINIFCN_DEVICE", raising=False)
    assert default_device() == "cpu"


@pytest.mark.parametrize("value", ["tpu", "gpu0", "cuda:1", "numpy"])
def test_minifcn_device_bad_value(monkeypatch, value):
    monkeypatch.setenv("MINIFCN_DEVICE", value)
    with pytest.raises(ValueError, match=rf"device must be 'cpu' or 'gpu', got {value!r}"):
        default_device()


@pytest.mark.parametrize("value", ["gpu", "GPU", "cuda"])
def test_gpu_without_cupy_is_a_clear_runtime_error(monkeypatch, no_cupy, value):
    monkeypatch.setenv("MINIFCN_DEVICE", value)
    with pytest.raises(RuntimeError, match=r"device 'gpu' was requested but CuPy .* not available"):
        default_device()
    with pytest.raises(RuntimeError, match=r"pip install 'minifcn\[gpu\]'"):
        check_device(value)
    with pytest.raises(RuntimeError, match=r"CuPy"):
        to_device(np.zeros(2), "gpu")
    with pytest.raises(RuntimeError, match=r"CuPy"):
        Conv2d(1, 1, 1).to("gpu")
    assert not backend.gpu_available()


@pytest.mark.gpu
@pytest.mark.skipif(not backend.gpu_available(), reason="CuPy with a visible CUDA device is not available")
def test_gpu_device_when_available(monkeypatch):
    import cupy  # noqa: PLC0415

    monkeypatch.setenv("MINIFCN_DEVICE", "gpu")
    assert default_device() == "gpu" and module_for_device("gpu") is cupy
    a = to_device(np.arange(3.0), "gpu")
    assert device_of(a) == "gpu" and get_array_module(a) is cupy
    np.testing.assert_array_equal(to_numpy(a), [0.0, 1.0, 2.0])
    layer = Conv2d(1, 2, 3).to("gpu")
    assert get_array_module(layer.weight.data) is cupy and get_array_module(layer.weight.grad) is cupy
    layer.to("cpu")
    assert type(layer.weight.data) is np.ndarray


def test_to_numpy_and_to_device_on_the_cpu():
    a = np.arange(6.0).reshape(2, 3)
    assert to_numpy(a) is a
    np.testing.assert_array_equal(to_numpy([1, 2]), np.array([1, 2]))
    assert to_device(a, "cpu") is a
    assert to_device(None, "cpu") is None
    assert device_of(a) == "cpu"
    assert module_for_device("cpu") is np


def test_to_numpy_copies_from_the_gpu(xp):
    a = xp.arange(4.0)
    b = to_numpy(a)
    assert type(b) is np.ndarray
    np.testing.assert_array_equal(b, [0.0, 1.0, 2.0, 3.0])


def test_importing_minifcn_does_not_import_cupy_or_torch():
    code = ("import sys; import minifcn, minifcn.layers, minifcn.gradcheck, minifcn.reference; "
            "bad = sorted(m for m in ('cupy', 'torch') if m in sys.modules); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={"MINIFCN_DEVICE": "gpu", "PATH": "", "PYTHONPATH": ":".join(sys.path)})
    assert done.returncode == 0, done.stdout + done.stderr


class GpuStandIn:
    """Looks like a CuPy array to minifcn's device checks (its type's module is ``cupy``), holds a
    NumPy array for shape and dtype; any real computation with it would fail, so each check below
    must stop it first."""

    __module__ = "cupy._core.core"

    def __init__(self, array):
        self.array = np.asarray(array)
        self.shape, self.dtype, self.ndim, self.size = self.array.shape, self.array.dtype, self.array.ndim, self.array.size


def test_a_mismatched_device_is_named_by_the_layers_input_checks():
    """A model on one device fed a batch from the other gets an error naming both devices (instead of
    CuPy's TypeError on an implicit conversion, or a silent copy)."""
    from minifcn.layers import Add, ConvTranspose2d, SoftmaxCrossEntropy  # noqa: PLC0415
    from minifcn.models import FCN8s  # noqa: PLC0415

    assert device_of(GpuStandIn([1.0])) == "gpu"
    on_gpu = r"on the GPU \(a CuPy array\)"
    on_cpu = r"on the CPU \(a NumPy array\)"
    x = np.zeros((1, 2, 5, 5), np.float32)
    for cls in (Conv2d, ConvTranspose2d):
        with pytest.raises(ValueError, match=rf"{cls.__name__}: input {on_gpu}, weights {on_cpu}; .*to_device"):
            cls(2, 3, 3)(GpuStandIn(x))
        layer = cls(2, 3, 3)
        layer.weight.data = GpuStandIn(layer.weight.data)  # a layer moved to the GPU, a NumPy batch
        with pytest.raises(ValueError, match=rf"{cls.__name__}: input {on_cpu}, weights {on_gpu}; .*model.to\('cpu'\)"):
            layer(x)
    with pytest.raises(ValueError, match=rf"FCN8s|Conv2d: input {on_gpu}, weights {on_cpu}"):
        FCN8s(num_classes=2, width=1 / 64)(GpuStandIn(np.zeros((1, 3, 8, 8), np.float32)))
    with pytest.raises(ValueError, match=rf"SoftmaxCrossEntropy: labels {on_gpu}, logits {on_cpu}"):
        SoftmaxCrossEntropy()(np.zeros((1, 3, 2, 2)), GpuStandIn(np.zeros((1, 2, 2), np.int64)))
    with pytest.raises(ValueError, match=rf"Add: first input {on_cpu}, second input {on_gpu}"):
        Add()(x, GpuStandIn(x))


def test_constant_arrays_are_made_once_and_read_only():
    from minifcn import backend

    zeros = backend.constant_array(np, (3, 4), np.float32, 0)
    assert zeros is backend.constant_array(np, [3, 4], np.dtype("float32"), 0)
    assert zeros.dtype == np.float32 and zeros.shape == (3, 4) and not zeros.any()
    ones = backend.constant_array(np, (3, 4), np.float32, 1)
    assert ones is not zeros and (ones == 1).all()
    assert backend.constant_array(np, (3, 4), np.float64, 0).dtype == np.float64
    with pytest.raises(ValueError, match="read-only"):
        zeros[0, 0] = 1
