"""ReLU and (inverted) Dropout."""
from __future__ import annotations

import numpy as np

from ..backend import constant_array, elementwise_kernel, get_array_module
from ..module import Module
from ..parallel import pieces, run_pieces
from ._checks import check_grad, need_forward


ZERO_BLOCK_MOST = 1 << 18  # elements of the zeros ReLU's maximum is taken against (a plane, else a row)


def _zero_block(shape):
    """The shape of the zeros that ``max(x, 0)`` broadcasts over x: its last two axes, or the last one
    where that plane exceeds ``ZERO_BLOCK_MOST`` elements. An array, not the scalar 0: the same numbers
    (NaN stays NaN), but NumPy 2.4's float ``maximum`` against a scalar ran 3x slower than against an
    array on the AMD EPYC Zen 2, and against a row 1.4 to 1.9x slower than against a plane (benchmarks/RESULTS.md,
    "ReLU")."""
    plane = tuple(shape[-2:])
    return plane if int(np.prod(plane)) <= ZERO_BLOCK_MOST else tuple(shape[-1:])


class ReLU(Module):
    """``y = max(x, 0)``; ``dx = dy * [y > 0]`` (the gradient at exactly 0 is 0).

    Shapes: any -> same. ``inplace=True`` overwrites the input (saves memory
    when the caller no longer needs it, as in a plain chain of layers).
    One route (on the CPU, large arrays cut into one piece per core); loop
    twins: :func:`minifcn.reference.relu`, :func:`minifcn.reference.relu_backward`.
    """

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = bool(inplace)
        self._mask = None

    def forward(self, x):
        xp = get_array_module(x)
        y = x if self.inplace else xp.empty_like(x)
        mask = xp.empty(x.shape, dtype=bool)
        zeros = constant_array(xp, _zero_block(x.shape), x.dtype, 0)  # made once, read-only

        def piece(i):  # on the CPU, large batches are cut into one piece per core
            xp.maximum(x[i], zeros, out=y[i])
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


# Dropout's device masks: element i of a forward's mask is kept when the top 24 bits of
# splitmix64(seed + (i + 1) * golden) reach p * 2^24. A counter-based hash, so each element is
# drawn independently on the GPU from one seed, with no generator state on the device.
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_KEEP_OPERATION = f"""
unsigned long long z = seed + (unsigned long long)(i + 1) * {_GOLDEN}ULL;
z = (z ^ (z >> 30)) * {_MIX1}ULL;
z = (z ^ (z >> 27)) * {_MIX2}ULL;
z = z ^ (z >> 31);
mask = (z >> 40) >= threshold ? scale : (T)0;
"""


def hashed_keep_mask(seed: int, size: int, threshold: int, scale, xp=np, dtype=np.float64):
    """Dropout's device mask (flat, ``size`` elements): ``scale`` where kept, 0 where dropped.

    The same maths as the CuPy kernel ``_KEEP_OPERATION``, written in NumPy's
    wrapping uint64 arithmetic; on CuPy the kernel runs instead (one pass, no
    temporaries). Keep probability: ``1 - threshold / 2^24``.
    """
    dtype = np.dtype(dtype)
    if xp is not np:
        mask = xp.empty(size, dtype=dtype)
        kernel = elementwise_kernel("uint64 seed, uint64 threshold, T scale", "T mask", _KEEP_OPERATION,
                                    "minifcn_dropout_mask")
        kernel(np.uint64(seed), np.uint64(threshold), dtype.type(scale), mask)
        return mask
    bits = splitmix64(seed, size)
    return np.where((bits >> np.uint64(40)) >= np.uint64(threshold), dtype.type(scale), dtype.type(0))


def splitmix64(seed: int, size: int):
    """Outputs 1 .. size of Vigna's SplitMix64 started at ``seed`` (uint64, NumPy; wrapping arithmetic)."""
    z = np.uint64(seed) + (np.arange(size, dtype=np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
    return z ^ (z >> np.uint64(31))


class Dropout(Module):
    """Inverted dropout: in training, ``y = x * m / (1 - p)`` with ``m ~ Bernoulli(1 - p)``;
    in eval mode the identity. Backward multiplies by the same mask.

    ``seed`` makes the masks reproducible; the layer's one random state is
    the NumPy Generator ``rng`` on the host (what checkpoints save). Where
    the masks are drawn:

    * NumPy inputs: by ``rng`` on the host.
    * CuPy inputs (default): on the GPU, by a counter-based hash of a seed
      that ``rng`` draws each forward (:func:`hashed_keep_mask`), so nothing
      is copied to the device. The masks then differ from the CPU's for the
      same seed, as any device generator's would; runs on one device are
      still reproducible and resume exactly from a checkpoint.
    * CuPy inputs with ``host_masks=True``: by ``rng`` on the host, then
      copied: the same masks on either device (CPU/GPU comparisons), at the
      cost of a host draw and a copy each forward.

    Loop twins (given the mask): :func:`minifcn.reference.dropout`,
    :func:`minifcn.reference.dropout_backward`.
    """

    def __init__(self, p: float = 0.5, seed=None, host_masks: bool = False):
        super().__init__()
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p!r}")
        self.p = float(p)
        self.rng = np.random.default_rng(seed)
        self.host_masks = bool(host_masks)
        self._mask = None

    def _draw_mask(self, xp, shape, dtype):
        """The scaled mask ``m / (1 - p)`` of ``shape``, on xp's device."""
        scale = dtype.type(1.0 / (1.0 - self.p))
        if xp is np or self.host_masks:
            keep = self.rng.random(shape, dtype=np.float32) >= self.p
            return xp.asarray(keep.astype(dtype) * scale)
        seed = int(self.rng.integers(2**63))
        threshold = int(np.ceil(self.p * 2**24))
        return hashed_keep_mask(seed, int(np.prod(shape)), threshold, scale, xp, dtype).reshape(shape)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self._mask = 1.0
            self._shape = x.shape
            return x
        xp = get_array_module(x)
        self._mask = self._draw_mask(xp, x.shape, x.dtype)
        self._shape = x.shape
        return x * self._mask

    def backward(self, dy):
        mask = need_forward(self._mask, "Dropout")
        check_grad(dy, self._shape, "Dropout")
        return dy * mask if not isinstance(mask, float) else dy

    def extra_repr(self):
        return f"p={self.p}" + (", host_masks=True" if self.host_masks else "")
