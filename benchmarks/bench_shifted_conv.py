"""Prototype: a stride-1 convolution as a sum of k*k shifted products, no column buffer, against the current route.

For a stride-1, dilation-1 convolution, output pixel (r, c) reads padded input pixels (r + i, c + j).
Flatten the padded input of one image to (C, Hp*Wp) and compute the output on the padded width Wp
(the last kw - 1 columns of each row are junk, cut off at the end). Then the input pixels that tap
(i, j) reads are one contiguous slice starting at ``i * Wp + j``, and

    y_wide = sum over (i, j) of  W[:, :, i, j] @ xpad_flat[:, i*Wp + j : i*Wp + j + OH*Wp]

is k*k products of (Cout x Cin) by (Cin x OH*Wp) with no unfolding at all. The weight gradient is the
same slices the other way round, k*k products with the long pixel axis as the inner dimension:

    dW[:, :, i, j] = dy_wide @ xpad_flat[:, i*Wp + j : ...].T      (dy_wide: dy with zero junk columns)

and the input gradient scatters W[:, :, i, j].T @ dy_wide into the same shifted slices of a padded
buffer. Each function works on ``rows`` output rows at a time so its slices stay in cache.

These are standalone prototypes (issue 13) to be ported into the route registry of
minifcn/layers/conv.py (issue 12); this script checks each against the current route, then times them
interleaved on the small FCN-8s's skinny high-resolution layers at the training recipe's input.

    python benchmarks/bench_shifted_conv.py                 # conv1_1 ... conv2_2, 1 x 3 x 128 x 128
    python benchmarks/bench_shifted_conv.py --rows 8,32,0 --rounds 9
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads (see bench_fcn.py)
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import interleaved, machine_line, print_table  # noqa: E402

from minifcn.layers.conv import conv2d_forward, conv2d_input_grad, conv2d_weight_grad  # noqa: E402
from minifcn.models.trace import fcn_blobs  # noqa: E402
from minifcn.train import TrainConfig, build_from_config  # noqa: E402


def _padded_flat(x, kh, kw, padding):
    """(N, C, Hp*Wp + kw - 1) zero-padded copy of x (the tail lets the last tap's slice run to its end)."""
    n, c, h, w = x.shape
    p = padding
    hp, wp = h + 2 * p, w + 2 * p
    flat = np.zeros((n, c, hp * wp + kw - 1), dtype=x.dtype)
    flat[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, p:p + h, p:p + w] = x
    return flat, hp, wp


def _row_bands(oh, rows):
    rows = rows or oh
    return [(r0, min(oh, r0 + rows)) for r0 in range(0, oh, rows)]


def shifted_forward(x, weight, padding, bias=None, rows=0):
    """Inputs: x (N, Cin, H, W), weight (Cout, Cin, kh, kw), stride 1; ``rows`` output rows a band (0: all).
    Returns: y (N, Cout, OH, OW)."""
    n = x.shape[0]
    cout, _, kh, kw = weight.shape
    xflat, hp, wp = _padded_flat(x, kh, kw, padding)
    oh, ow = hp - kh + 1, wp - kw + 1
    taps = [(np.ascontiguousarray(weight[:, :, i, j]), i * wp + j) for i in range(kh) for j in range(kw)]
    ywide = np.empty((n, cout, oh * wp), dtype=x.dtype)
    tmp = np.empty((n, cout, (rows or oh) * wp), dtype=x.dtype)
    for r0, r1 in _row_bands(oh, rows):
        band = ywide[:, :, r0 * wp:r1 * wp]
        t = tmp[:, :, :band.shape[2]]
        for k, (w_ij, off) in enumerate(taps):
            src = xflat[:, :, r0 * wp + off:r1 * wp + off]
            if k == 0:
                np.matmul(w_ij, src, out=band)
            else:
                np.matmul(w_ij, src, out=t)
                band += t
        if bias is not None:
            band += bias.reshape(cout, 1)
    return np.ascontiguousarray(ywide.reshape(n, cout, oh, wp)[:, :, :, :ow])


def shifted_weight_grad(dy, x, weight_shape, padding, rows=0):
    """Inputs: dy (N, Cout, OH, OW), x (N, Cin, H, W). Returns: dW (Cout, Cin, kh, kw)."""
    n, cout, oh, ow = dy.shape
    _, cin, kh, kw = weight_shape
    xflat, hp, wp = _padded_flat(x, kh, kw, padding)
    dywide = np.zeros((n, cout, oh, wp), dtype=dy.dtype)
    dywide[:, :, :, :ow] = dy
    dywide = dywide.reshape(n, cout, oh * wp)
    dw = np.zeros((kh, kw, cout, cin), dtype=dy.dtype)
    part = np.empty((n, cout, cin), dtype=dy.dtype)
    for r0, r1 in _row_bands(oh, rows):
        g = dywide[:, :, r0 * wp:r1 * wp]
        for i in range(kh):
            for j in range(kw):
                off = i * wp + j
                src = xflat[:, :, r0 * wp + off:r1 * wp + off]
                np.matmul(g, src.transpose(0, 2, 1), out=part)
                dw[i, j] += part.sum(axis=0)
    return np.ascontiguousarray(dw.transpose(2, 3, 0, 1))


def shifted_input_grad(dy, weight, x_shape, padding, rows=0):
    """Inputs: dy (N, Cout, OH, OW), weight (Cout, Cin, kh, kw). Returns: dx of x_shape (N, Cin, H, W)."""
    n, cout, oh, ow = dy.shape
    _, cin, kh, kw = weight.shape
    _, _, h, w = x_shape
    p = padding
    hp, wp = h + 2 * p, w + 2 * p
    dywide = np.zeros((n, cout, oh, wp), dtype=dy.dtype)
    dywide[:, :, :, :ow] = dy
    dywide = dywide.reshape(n, cout, oh * wp)
    dxflat = np.zeros((n, cin, hp * wp + kw - 1), dtype=dy.dtype)
    taps = [(np.ascontiguousarray(weight[:, :, i, j].T), i * wp + j) for i in range(kh) for j in range(kw)]
    tmp = np.empty((n, cin, (rows or oh) * wp), dtype=dy.dtype)
    for r0, r1 in _row_bands(oh, rows):
        g = dywide[:, :, r0 * wp:r1 * wp]
        t = tmp[:, :, :g.shape[2]]
        for wt_ij, off in taps:
            np.matmul(wt_ij, g, out=t)
            dxflat[:, :, r0 * wp + off:r1 * wp + off] += t
    return np.ascontiguousarray(dxflat[:, :, :hp * wp].reshape(n, cin, hp, wp)[:, :, p:p + h, p:p + w])


def recipe_layers(names):
    """(name, input shape, weight, bias, padding) of the training recipe's model at its input size."""
    cfg = TrainConfig()
    model = build_from_config(cfg, 6)
    blobs = {b.name: b for b in fcn_blobs(model, cfg.image_size)}
    order = [b.name for b in fcn_blobs(model, cfg.image_size)]
    out = []
    for name in names:
        layer = getattr(model, name)
        src = blobs[order[order.index(name) - 1]]
        assert layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.padding[0] == layer.padding[1]
        out.append((name, (cfg.batch_size,) + tuple(src.shape), layer.weight.data, layer.bias.data,
                    layer.padding[0]))
    return out


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="conv1_1,conv1_2,conv2_1,conv2_2")
    p.add_argument("--rows", default="16,0", help="comma list of band heights in output rows (0: the whole map)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    rows_list = [int(r) for r in args.rows.split(",")]
    print(machine_line())
    rng = np.random.default_rng(0)
    table = []
    for name, x_shape, weight, bias, pad in recipe_layers(args.layers.split(",")):
        x = rng.standard_normal(x_shape).astype(np.float32)
        geom = ((1, 1), (pad, pad), (1, 1))
        y = conv2d_forward(x, weight, *geom, bias=bias)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        current = {
            "forward": lambda: conv2d_forward(x, weight, *geom, bias=bias),
            "weight grad": lambda: conv2d_weight_grad(dy, x, weight.shape, *geom),
            "input grad": lambda: conv2d_input_grad(dy, weight, x.shape, *geom),
        }
        reference = {what: fn() for what, fn in current.items()}
        for what in current:
            candidates = {"current": current[what]}
            for rows in rows_list:
                fn = {"forward": lambda r=rows: shifted_forward(x, weight, pad, bias, r),
                      "weight grad": lambda r=rows: shifted_weight_grad(dy, x, weight.shape, pad, r),
                      "input grad": lambda r=rows: shifted_input_grad(dy, weight, x.shape, pad, r)}[what]
                err = rel_err(fn(), reference[what])
                if err > 1e-4:
                    raise AssertionError(f"{name} {what} rows={rows}: shifted route differs by {err:.2e}")
                candidates[f"shifted rows={rows or 'all'}"] = fn
            times = interleaved(candidates, rounds=args.rounds, warmup=1)
            base = times["current"].median
            for cand, t in times.items():
                table.append((name, f"{x_shape[1]}->{weight.shape[0]} at {x_shape[2] + 2 * pad}", what, cand,
                              1e3 * t.median, t.median / base))
    print(f"\nstride-1 3x3 convolutions of the training recipe's model (batch 1), medians of {args.rounds} "
          f"interleaved rounds; ratio = candidate / current route")
    print_table(("layer", "channels at padded side", "what", "route", "ms", "ratio"), table,
                (None, None, None, None, ".2f", ".2f"))


if __name__ == "__main__":
    main()
