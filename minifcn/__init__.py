"""minifcn: fully convolutional networks from scratch on NumPy and CuPy."""
import os

# OpenBLAS reads this once, when NumPy loads: its idle threads then sleep almost at once instead of
# spinning after every product, so a busy neighbour process keeps its core and the training step does
# not wait for a spinning thread to be scheduled (benchmarks/RESULTS.md, "Under load"). Set here
# because both entry points (`minifcn`, `python -m minifcn`) import this package before NumPy; a value
# already in the environment wins, and once NumPy is loaded it changes nothing.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .backend import get_array_module, gpu_available, to_device, to_numpy
from .module import Module, Parameter, Sequential
from .routes import route

__version__ = "0.1.0"
__all__ = ["Module", "Parameter", "Sequential", "route", "get_array_module", "gpu_available", "to_device", "to_numpy",
           "__version__"]
