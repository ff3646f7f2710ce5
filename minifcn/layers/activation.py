"""ReLU and (inverted) Dropout."""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..module import Module
from ..parallel import pieces, run_pieces
from ._checks import check_grad, need_forward


class ReLU(Module):
    """``y = max(x, 0)``; ``dx = dy * [y > 0]`` (the gradient at exactly 0 is 0).

    Shapes: any -> same. ``inplace=True`` overwrites the input (saves memory
    when the caller no longer needs it, as in a plain chain of layers).
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)
        self._mask = None

    def forward(self, x):
        xp = get_array_module(x)
        y = x if self.inplace else xp.empty_like(x)
        mask = xp.empty(x.shape, dtype=bool)

        def piece(i):  # on the CPU, large batches are cut into one piece per core
            xp.maximum(x[i], 0, out=y[i])
            xp.greater(y[i], 0, out=mask[i])

        run_pieces(pieces(xp, x.shape, x.nbytes), piece)
        self._mask = mask
        return y

    def backward(self, dy):
        mask = need_forward(self._mask, "ReLU")
        check_grad(dy, mask.shape, "ReLU")
        xp = get_array_module(dy)
        dx = xp.empty(dy.shape, dtype=dy.dtype)

        def piece(i):
            xp.multiply(dy[i], mask[i], out=dx[i])

        run_pieces(pieces(xp, dy.shape, dy.nbytes), piece)
        return dx


class Dropout(Module):
    """Inverted dropout: in training, ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``;
    in eval mode the identity. Backward multiplies by the same mask.

    ``seed`` makes the masks reproducible. Masks are drawn by NumPy's
    Generator on the host (and copied to the GPU for CuPy inputs), so a run
    gives the same masks on either device.
    """

    def __init__(self, p: float = 0.5, seed=None):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)
        self._mask = None

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = 1.0
            self._shape = x.shape
            return x
        xp = get_array_module(x)
        keep = self.rng.random(x.shape, dtype=np.float32) >= self.p
        self._mask = xp.asarray(keep.astype(x.dtype) * x.dtype.type(1.0 / (1.0 - self.p)))
        self._shape = x.shape
        return x * self._mask

    def backward(self, dy):
        mask = need_forward(self._mask, "Dropout")
        check_grad(dy, self._shape, "Dropout")
        return dy * mask if not isinstance(mask, float) else dy

    def extra_repr(self):
        return f"p={self.p}"
