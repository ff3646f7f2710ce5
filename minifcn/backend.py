"""The one backend switch: NumPy on the CPU, CuPy on an NVIDIA GPU.

Layers never ask "am I on the GPU?". They ask the data which array module it
belongs to (``xp = get_array_module(x)``) and write ``xp.zeros``, ``xp.maximum``
and so on. Importing minifcn never imports CuPy unless a GPU array is used or
the GPU device is requested.
"""
from __future__ import annotations

import functools
import os

import numpy as np

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """Return the ``cupy`` module if it is importable and sees a GPU, else None."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy  # noqa: PLC0415 (optional dependency)

            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception:  # ImportError, CUDA driver missing, no device...
            _cupy = None
    return _cupy


def gpu_available() -> bool:
    """True when CuPy is installed and at least one CUDA device is visible."""
    return cupy_or_none() is not None


def get_array_module(*arrays):
    """Return ``cupy`` if any argument is a CuPy array, else ``numpy``.

    Arguments that are not arrays (None, Python numbers) are ignored.
    """
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            return cupy_or_none() or __import__("cupy")
    return np


def default_device() -> str:
    """The device named by ``MINIFCN_DEVICE`` (``cpu`` or ``gpu``); ``cpu`` if unset."""
    name = os.environ.get("MINIFCN_DEVICE", "cpu").strip().lower() or "cpu"
    return check_device(name)


def check_device(device: str | None) -> str:
    """Normalise a device name: None means :func:`default_device`; ``cuda`` is ``gpu``."""
    if device is None:
        return default_device()
    name = str(device).strip().lower()
    if name == "cuda":
        name = "gpu"
    if name not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if name == "gpu" and not gpu_available():
        raise RuntimeError(
            "device 'gpu' was requested but CuPy with a visible CUDA device is not "
            "available; install the GPU extra on a machine with an NVIDIA GPU (pip install 'minifcn[gpu]' "
            "for a CUDA 12 driver, 'minifcn[gpu-cuda13]' for CUDA 13; see docs/gpu.md), or use device='cpu'"
        )
    return name


def module_for_device(device: str | None):
    """The array module (numpy or cupy) that holds arrays on ``device``."""
    return cupy_or_none() if check_device(device) == "gpu" else np


def to_device(array, device: str | None = None):
    """Copy ``array`` to ``device`` ('cpu' or 'gpu'); a no-op if it is already there."""
    device = check_device(device)
    if array is None:
        return None
    if device == "cpu":
        return to_numpy(array)
    cp = cupy_or_none()
    return cp.asarray(array)


def to_numpy(array):
    """Return ``array`` as a NumPy array (copying it from the GPU if needed)."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def device_of(array) -> str:
    """'gpu' for a CuPy array, 'cpu' otherwise (asks the array's type only: never imports CuPy)."""
    return "gpu" if type(array).__module__.startswith("cupy") else "cpu"


CONSTANTS_KEPT = 32  # constant arrays kept by :func:`constant_array` (then forgotten, all at once)
_constants = {}


def constant_array(xp, shape, dtype, value):
    """A read-only array of ``shape`` filled with ``value``, made once per array module, dtype, shape and
    value and then reused (ReLU's zeros, the bias gradient's ones): a fresh one at every call would be a new
    allocation, whose pages the first read faults in. Never write into it (NumPy refuses; CuPy cannot)."""
    key = (xp.__name__, np.dtype(dtype).str, tuple(shape), value)
    array = _constants.get(key)
    if array is None:
        if len(_constants) >= CONSTANTS_KEPT:
            _constants.clear()
        array = _constants[key] = xp.full(shape, value, dtype=dtype)
        if xp is np:
            array.flags.writeable = False
    return array


@functools.lru_cache(maxsize=None)
def elementwise_kernel(in_params: str, out_params: str, operation: str, name: str, options: tuple = ()):
    """A ``cupy.ElementwiseKernel``, made once per set of arguments (CuPy compiles it on first call
    and caches the binary per device).

    ``operation`` is the C body run for each element ``i``; output parameters
    passed in by the caller are read and written in place. The few kernels
    minifcn writes (SGD's update, the confusion matrix's counting, dropout's
    masks) each sit beside the NumPy code they replace, with the same maths.
    """
    import cupy  # noqa: PLC0415 (reached only with CuPy arrays)

    return cupy.ElementwiseKernel(in_params, out_params, operation, name, options=options)
