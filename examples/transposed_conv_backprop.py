"""Transposed convolution is the adjoint of convolution: ConvTranspose2d(y) = C^T y = Conv2d.backward(y).

Prints the matrix C of a small convolution, checks the identities in float64
for several geometries, works the 2x2 example of docs/transposed_convolution.md,
and draws two figures into --out:

* transposed_conv.png: the 2x2 example as stamps, and the matrix C;
* checkerboard.png: kernel 3 / stride 2 versus kernel 4 / stride 2 on a
  constant and a smooth image.

    python examples/transposed_conv_backprop.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _figure as fig  # noqa: E402  (also makes minifcn importable from a checkout)
import numpy as np  # noqa: E402

from minifcn.explain import conv_matrix, conv_matrix_report, transposed_conv_demo  # noqa: E402
from minifcn.layers import ConvTranspose2d, upsample_filt  # noqa: E402

GEOMETRIES = [  # (in_shape (C, H, W), out channels, kernel, stride, padding, dilation)
    ((1, 4, 4), 1, 3, 2, 1, 1), ((2, 5, 6), 3, 3, 1, 1, 1), ((3, 7, 7), 2, 4, 2, 1, 1),
    ((2, 9, 8), 2, 3, 2, 2, 2), ((1, 8, 8), 1, 2, 2, 0, 1), ((2, 6, 7), 2, (2, 3), (1, 2), (0, 1), 1),
    ((1, 11, 9), 2, 5, 3, 2, 1), ((4, 6, 6), 3, 1, 1, 0, 1),
]


def check_identities(quick):
    rng = np.random.default_rng(0)
    worst = 0.0
    print("\nConvTranspose2d(y) = C^T y, Conv2d.backward(dy) = C^T dy, ConvTranspose2d.backward(dz) = C dz:")
    for in_shape, cout, k, s, p, d in GEOMETRIES[:3] if quick else GEOMETRIES:
        kh, kw = (k, k) if np.isscalar(k) else k
        weight = rng.standard_normal((cout, in_shape[0], kh, kw))
        demo = transposed_conv_demo(in_shape, weight, stride=s, padding=p, dilation=d, seed=1)
        print(f"  input {in_shape}, {cout} out, kernel {k}, stride {s}, padding {p}, dilation {d}: "
              f"C is {demo.C.shape[0]}x{demo.C.shape[1]}, max error {demo.max_err:.1e}")
        worst = max(worst, demo.max_err)
    print(f"largest error over all geometries: {worst:.1e}")
    return worst


def worked_example():
    X = np.array([[1.0, 2.0], [3.0, 4.0]])
    K = np.array([[1.0, 10.0], [100.0, 1000.0]])
    outputs = {}
    for stride in (1, 2):
        t = ConvTranspose2d(1, 1, 2, stride=stride, bias=False, dtype=np.float64)
        t.weight.data[...] = K
        outputs[stride] = t(X[None, None])[0, 0]
        print(f"\n2x2 example, X = {X.astype(int).tolist()}, K = {K.astype(int).tolist()}, stride {stride}:")
        print(outputs[stride].astype(int))
    assert outputs[1][1, 1] == 1234 and outputs[2].shape == (4, 4)
    return X, K, outputs


def upsample2(image, kernel):
    k = kernel.shape[0]
    t = ConvTranspose2d(1, 1, k, stride=2, padding=1, output_padding=k % 2, bias=False, dtype=np.float64)
    t.weight.data[...] = kernel
    return t(image[None, None])[0, 0]


def figure_example(X, K, outputs, out_dir):
    """The stamps of the stride-1 example, their sum, the stride-2 output, and C."""
    stamps = []
    for i, j in np.ndindex(X.shape):
        canvas = np.zeros((3, 3))
        canvas[i:i + 2, j:j + 2] = X[i, j] * K
        mask = np.zeros((3, 3), bool)
        mask[i:i + 2, j:j + 2] = True
        stamps.append(fig.number_grid(canvas, cell=40, highlight=mask))
    c1 = conv_matrix((1, 3, 3), K[None, None], stride=1)
    row1 = [fig.number_grid(X, cell=40), fig.number_grid(K, cell=40), *stamps,
            fig.number_grid(outputs[1], cell=40, highlight=np.ones((3, 3), bool))]
    titles1 = ["input X", "kernel K", "X[0,0] K", "+ X[0,1] K", "+ X[1,0] K", "+ X[1,1] K", "= stride 1 (3x3)"]
    block = np.zeros((4, 4), bool)
    block[:2, :2] = block[2:, 2:] = True
    row2 = [fig.number_grid(outputs[2], cell=40, highlight=block), fig.number_grid(c1, cell=40)]
    titles2 = ["stride 2 (4x4):\nstamps do not overlap",
               "C of the stride-1 convolution 3x3 -> 2x2 (4 x 9):\nConvTranspose2d computes C^T X"]
    caption = ("Each input pixel stamps a scaled copy of K (shaded); overlapping stamps add.\n"
               "The centre 1234 = 1000*1 + 100*2 + 10*3 + 1*4: X[0,0] arrives through the bottom-right tap K[1,1].\n"
               "Row r of C is where output r of the convolution reads, i.e. where input r of the transpose stamps.")
    image = fig.stack([fig.compose([row1], titles=[titles1], title_h=24),
                       fig.compose([row2], titles=[titles2], title_h=40, caption=caption)])
    return fig.save(image, out_dir, "transposed_conv.png")


def figure_checkerboard(out_dir, quick):
    n = 8 if quick else 16
    flat = np.ones((n, n))
    yy, xx = np.mgrid[0:n, 0:n] / (n - 1)
    smooth = 0.5 + 0.25 * np.sin(2.2 * np.pi * xx) * np.cos(1.4 * np.pi * yy) + 0.2 * xx
    kernels = [("all-ones kernel 3, stride 2", np.ones((3, 3))),
               ("all-ones kernel 4, stride 2", np.ones((4, 4))),
               ("bilinear kernel 4, stride 2", upsample_filt(4))]
    rows, titles, stats = [], [], {}
    scale = 192 // (2 * n)
    for name, kernel in kernels:
        a, b = upsample2(flat, kernel), upsample2(smooth, kernel)
        inner = a[2:-2, 2:-2]
        stats[name] = sorted({float(v) for v in np.round(inner, 6).ravel()})
        side = 2 * n * scale
        k_tile = fig.number_grid(kernel, cell=30 if kernel.shape[0] == 3 else 26,
                                 fmt=lambda v: f"{v:.0f}" if float(v).is_integer() else f"{v:.3f}".lstrip("0"), size=10)
        mid = b[n, 2:-2] / kernel.sum() * 4
        rows.append([k_tile, fig.enlarge(fig.colormap(a, 0, a.max()), (side, side)),
                     fig.enlarge(fig.colormap(b), (side, side)),
                     fig.line_plot([mid], size=(240, 150), title="middle row of the smooth output")])
        titles.append(["kernel", "constant input: overlap", "smooth input", ""])
    image = fig.compose(rows, titles=titles, row_titles=[k[0].replace(", ", ",\n") for k in kernels],
                        row_title_w=150,
                        caption="Upsampling by 2 with a transposed convolution (padding 1). Kernel 3 at stride 2 "
                                "covers even outputs with 1 tap and odd outputs with 2:\nthe 1-2-1-2 overlap is a "
                                "checkerboard even on a constant image. Kernel 4 covers every output with 2 taps; "
                                "a bilinear kernel is also flat.")
    path = fig.save(image, out_dir, "checkerboard.png")
    for name, values in stats.items():
        print(f"checkerboard: {name}: interior values of a constant image {values}")
    return path, stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer geometries, smaller images (for tests)")
    parser.add_argument("--out", default="runs/examples", help="folder for the PNGs")
    args = parser.parse_args(argv)

    print(conv_matrix_report(size=4, kernel=3, stride=2, padding=1))
    worst = check_identities(args.quick)
    X, K, outputs = worked_example()
    paths = [figure_example(X, K, outputs, args.out)]
    path, stats = figure_checkerboard(args.out, args.quick)
    paths.append(path)
    for p in paths:
        print(f"wrote {p}")
    ok = worst < 1e-12 and len(stats["all-ones kernel 3, stride 2"]) == 3 and len(stats["all-ones kernel 4, stride 2"]) == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
