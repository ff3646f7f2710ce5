"""minifcn: fully convolutional networks from scratch on NumPy and CuPy."""
from .backend import get_array_module, gpu_available, to_device, to_numpy
from .module import Module, Parameter, Sequential
from .routes import route

__version__ = "0.1.0"
__all__ = ["Module", "Parameter", "Sequential", "route", "get_array_module", "gpu_available", "to_device", "to_numpy",
           "__version__"]
