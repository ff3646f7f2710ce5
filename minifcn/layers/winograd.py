"""Winograd's minimal filtering F(2x2, 3x3): a 3x3 stride-1 convolution with 4 multiplications per output, not 9.

im2col multiplies each output pixel's 3x3 window by the kernel: 9 multiply-adds
per input channel and output pixel. Winograd's algorithm (Lavin and Gray, "Fast
Algorithms for Convolutional Neural Networks", CVPR 2016) cuts the output into
2x2 tiles. Tile ``(p, q)`` reads the 4x4 tile ``d`` of the padded input at
``(2p, 2q)``, and for each kernel ``g`` (3x3)::

    y_tile = A^T [ (G g G^T) * (B^T d B) ] A          (* element by element, 4x4)

with the constant matrices below (Bt = B^T, At = A^T). Summed over input
channels, the element-wise product becomes 16 matrix products, one for each
position ``k = 4a + b`` of the 4x4 transformed tile::

    U[k] = (G g G^T)[a, b]     (Cout, Cin)    the transformed kernels
    V[k] = (B^T d B)[a, b]     (Cin, tiles)   the transformed input tiles
    M[k] = U[k] @ V[k]         (Cout, tiles)
    y    = A^T M A per tile    (Cout, 2, 2 per tile)

16 multiply-adds per input channel and 2x2 tile: 4 per output pixel, 2.25 times
fewer than im2col, and the input is read as 16 values a tile (4 a pixel), not 9 a
pixel. Each transform is one product with a Kronecker matrix over the flattened
tiles: ``V = (Bt kron Bt) d``, ``U = (G kron G) g``, ``y = (At kron At) M``.

The weight gradient is the adjoint of the same chain (the forward is exactly the
convolution, a linear map of ``g``, so this is the exact gradient)::

    dM = (At kron At)^T dy_tiles,   dU[k] = dM[k] @ V[k]^T,   dW = (G kron G)^T dU

reusing the forward's V where the layer keeps it. The input gradient of a
stride-1 convolution is itself one (``flipped-kernel`` in :mod:`conv_fast`), so
it takes this route too. The rounding differs from im2col's (the transforms add
and subtract inputs of either sign), within float32's few units in the last place
for the small FCN's layers; the tests bound it against the textbook route.

Layout: tiles are numbered ``(n, p, q)``, row-major; a *band* is a range of
images (a batch) or, for one image, a range of tile rows, so its tiles are a
contiguous range of V's columns.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .columns import workspace

Bt = np.array([[1, 0, -1, 0],
               [0, 1, 1, 0],
               [0, -1, 1, 0],
               [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0],
              [0.5, 0.5, 0.5],
              [0.5, -0.5, 0.5],
              [0, 0, 1]], dtype=np.float64)
At = np.array([[1, 1, 1, 0],
               [0, 1, -1, -1]], dtype=np.float64)

# Kronecker forms on flattened tiles: (Bt kron Bt)[4a + b, 4i + j] = Bt[a, i] Bt[b, j], and so on.
_INPUT = np.kron(Bt, Bt)    # (16, 16): flattened 4x4 input tile -> V
_KERNEL = np.kron(G, G)     # (16, 9):  flattened 3x3 kernel -> U
_OUTPUT = np.kron(At, At)   # (4, 16):  M -> flattened 2x2 output tile


def _constant(matrix, xp, dtype):
    return xp.asarray(matrix, dtype=dtype)


class Tiling:
    """The 2x2 output tiles of a 3x3 stride-1 convolution of ``x_shape`` with ``padding``, ``out_hw`` outputs.

    ``tiles_hw = (th, tw)``: ceil(OH/2) x ceil(OW/2) tiles; the padded grid is
    (2 th + 2) x (2 tw + 2), zeros past the padding (they reach only outputs
    past OH, OW, which are dropped).
    """

    def __init__(self, x_shape, padding, out_hw):
        self.x_shape = tuple(int(s) for s in x_shape)
        self.padding, self.out_hw = tuple(padding), tuple(out_hw)
        self.tiles_hw = (-(-self.out_hw[0] // 2), -(-self.out_hw[1] // 2))

    @property
    def tiles(self):
        n = self.x_shape[0]
        return n * self.tiles_hw[0] * self.tiles_hw[1]

    def bands(self, pieces):
        """About ``pieces`` bands ``(n0, n1, p0, p1)``: images n0..n1, tile rows p0..p1 of each."""
        n, th = self.x_shape[0], self.tiles_hw[0]
        if pieces <= 1:
            return [(0, n, 0, th)]
        if n > 1:
            edges = [n * k // pieces for k in range(pieces + 1)]
            return [(a, b, 0, th) for a, b in zip(edges, edges[1:]) if b > a]
        edges = [th * k // pieces for k in range(pieces + 1)]
        return [(0, 1, a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def columns(self, band):
        """The band's range of tile columns of V and M."""
        n0, n1, p0, p1 = band
        th, tw = self.tiles_hw
        return (n0 * th + p0) * tw, ((n1 - 1) * th + p1) * tw

    def split_padded(self, x):
        """The padded grid's even and odd columns, each (N, C, 2 th + 2, tw + 1), so that every
        tile read is a contiguous run of a row (two copies of x instead of strided reads later)."""
        xp = get_array_module(x)
        n, c, h, w = self.x_shape
        (th, tw), (ph, pw) = self.tiles_hw, self.padding
        hp = 2 * th + 2
        rows = min(h, hp - ph)                          # x rows that land on the grid
        halves = []
        for parity in (0, 1):
            half = xp.zeros((n, c, hp, tw + 1), dtype=x.dtype)
            first = (parity - pw) % 2                   # x columns j with j + pw of this parity
            start = (first + pw) // 2                   # ... land on half column (j + pw) // 2
            count = max(0, min(len(range(first, w, 2)), tw + 1 - start))
            if rows > 0 and count > 0:
                half[:, :, ph:ph + rows, start:start + count] = x[:, :, :rows, first:first + 2 * count - 1:2]
            halves.append(half)
        return halves

    def gather_input(self, halves, band, out):
        """The band's 4x4 input tiles, ``out[4i + j, c, n, p, q] = xpad[n, c, 2p + i, 2q + j]``: (16, C, nb, pb, tw)."""
        n0, n1, p0, p1 = band
        tw = self.tiles_hw[1]
        for i in range(4):
            rows = slice(2 * p0 + i, 2 * (p1 - 1) + i + 1, 2)
            for j in range(4):
                half = halves[j % 2]                    # padded column 2q + j is half column q + j // 2
                out[4 * i + j] = half[n0:n1, :, rows, j // 2:j // 2 + tw].transpose(1, 0, 2, 3)
        return out


def transformed_kernels(weight):
    """U = (G kron G) g: (16, Cout, Cin) from weight (Cout, Cin, 3, 3)."""
    xp = get_array_module(weight)
    cout, cin = weight.shape[:2]
    flat = weight.reshape(cout * cin, 9).T                                      # (9, Cout*Cin)
    return xp.matmul(_constant(_KERNEL, xp, weight.dtype), flat).reshape(16, cout, cin)


def input_tiles(tiling, halves, band, out):
    """V of one band: (B^T d B) of its tiles, (16, Cin, band tiles), written into ``out``."""
    xp = get_array_module(out)
    n0, n1, p0, p1 = band
    cin, tw = tiling.x_shape[1], tiling.tiles_hw[1]
    d = workspace(xp, out.dtype, (16, cin, n1 - n0, p1 - p0, tw), "winograd input tiles")
    tiling.gather_input(halves, band, d)
    xp.matmul(_constant(_INPUT, xp, out.dtype), d.reshape(16, -1), out=out.reshape(16, -1))
    return out


def forward_band(tiling, u, v, band, y, bias=None):
    """Output rows of one band into y (N, Cout, OH, OW): M = U V, then (At kron At) M, tile by tile."""
    xp = get_array_module(v)
    n0, n1, p0, p1 = band
    cout, tw = u.shape[1], tiling.tiles_hw[1]
    nb, pb = n1 - n0, p1 - p0
    m = workspace(xp, v.dtype, (16, cout, v.shape[2]), "winograd products")
    xp.matmul(u, v, out=m)                                                      # 16 products (Cout, Cin) @ (Cin, tiles)
    tiles = workspace(xp, v.dtype, (4, cout * v.shape[2]), "winograd output tiles")
    xp.matmul(_constant(_OUTPUT, xp, v.dtype), m.reshape(16, -1), out=tiles)
    tiles = tiles.reshape(2, 2, cout, nb, pb, tw)
    oh, ow = tiling.out_hw
    for i in range(2):
        rows = range(2 * p0 + i, min(2 * p1, oh), 2)                          # output rows 2p + i of the band
        for j in range(2):
            cols = range(j, ow, 2)
            y[n0:n1, :, rows.start:rows.stop:2, j:ow:2] = (
                tiles[i, j, :, :, :len(rows), :len(cols)].transpose(1, 0, 2, 3))
    if bias is not None:
        y[n0:n1, :, 2 * p0:min(2 * p1, oh)] += bias.reshape(cout, 1, 1)


def output_tile_grads(tiling, dy, band):
    """dM of one band: (At kron At)^T of dy's 2x2 tiles (zeros past OH, OW), (16, Cout, band tiles)."""
    xp = get_array_module(dy)
    n0, n1, p0, p1 = band
    cout = dy.shape[1]
    tw, (oh, ow) = tiling.tiles_hw[1], tiling.out_hw
    nb, pb = n1 - n0, p1 - p0
    dyt = workspace(xp, dy.dtype, (2, 2, cout, nb, pb, tw), "winograd dy tiles")
    for i in range(2):
        rows = range(2 * p0 + i, min(2 * p1, oh), 2)
        for j in range(2):
            cols = range(j, ow, 2)
            part = dyt[i, j]
            part[:, :, len(rows):] = 0
            part[:, :, :, len(cols):] = 0
            part[:, :, :len(rows), :len(cols)] = dy[n0:n1, :, rows.start:rows.stop:2, j:ow:2].transpose(1, 0, 2, 3)
    dm = workspace(xp, dy.dtype, (16, cout * nb * pb * tw), "winograd product grads")
    xp.matmul(_constant(_OUTPUT, xp, dy.dtype).T, dyt.reshape(4, -1), out=dm)
    return dm.reshape(16, cout, nb * pb * tw)


def kernel_grad(du):
    """dW = (G kron G)^T dU: (Cout, Cin, 3, 3) from du (16, Cout, Cin)."""
    xp = get_array_module(du)
    _, cout, cin = du.shape
    flat = xp.matmul(_constant(_KERNEL, xp, du.dtype).T, du.reshape(16, -1))   # (9, Cout*Cin)
    return flat.reshape(3, 3, cout, cin).transpose(2, 3, 0, 1)
