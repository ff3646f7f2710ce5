"""Gradient-check every built-in layer and two layers of your own, one of them deliberately wrong.

Runs minifcn.gradcheck.run_suite (the same check as `python -m minifcn gradcheck`),
then check_layer on a LeakyReLU and a hand-written 1x1 convolution written
here, and on a copy of the 1x1 convolution whose input gradient forgets a
transpose. Draws every tensor's largest relative error against the
tolerance (gradcheck.png in --out).

    python examples/gradcheck_layers.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _figure as fig  # noqa: E402  (also makes minifcn importable from a checkout)
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from minifcn import Module, Parameter, get_array_module  # noqa: E402
from minifcn.gradcheck import check_layer, run_suite  # noqa: E402

TOL = 1e-6


class LeakyReLU(Module):
    """y = x if x > 0 else slope * x. (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, slope=0.1):
        super().__init__()
        self.slope = slope

    def forward(self, x):
        self._mask = x > 0
        return get_array_module(x).where(self._mask, x, self.slope * x)

    def backward(self, dy):
        return get_array_module(dy).where(self._mask, dy, self.slope * dy)


class Conv1x1(Module):
    """y[n, o] = sum_c W[o, c] x[n, c] + b[o] at every pixel. W (Cout, Cin), b (Cout,)."""

    def __init__(self, cin, cout, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        self.weight = Parameter(rng.standard_normal((cout, cin)))
        self.bias = Parameter(rng.standard_normal(cout))

    def forward(self, x):
        self._x = x
        return get_array_module(x).einsum("oc,nchw->nohw", self.weight.data, x) + self.bias.data[:, None, None]

    def backward(self, dy):
        xp = get_array_module(dy)
        self.weight.grad += xp.einsum("nohw,nchw->oc", dy, self._x)
        self.bias.grad += dy.sum(axis=(0, 2, 3))
        return xp.einsum("oc,nohw->nchw", self.weight.data, dy)


class Conv1x1Wrong(Conv1x1):
    """The same layer with a classic bug: W instead of W^T in the input gradient."""

    def backward(self, dy):
        xp = get_array_module(dy)
        self.weight.grad += xp.einsum("nohw,nchw->oc", dy, self._x)
        self.bias.grad += dy.sum(axis=(0, 2, 3))
        return xp.einsum("co,nohw->nchw", self.weight.data, dy)


def draw(rows, path_dir):
    """Horizontal bars of log10(max relative error) per checked tensor; FAIL in red."""
    f, small = fig.font(12), fig.font(11)
    label_w, bar_w, row_h, top = 330, 420, 15, 58
    lo, hi = -16, 2
    height = top + row_h * len(rows) + 70
    image = Image.new("RGB", (label_w + bar_w + 40, height), fig.WHITE)
    d = ImageDraw.Draw(image)
    d.text((10, 8), f"Largest relative error per tensor (float64 central differences); tolerance {TOL:g}", fill=fig.BLACK,
           font=fig.font(14))
    x_of = lambda e: label_w + (min(max(math.log10(max(e, 1e-300)), lo), hi) - lo) / (hi - lo) * bar_w  # noqa: E731
    for p in range(lo, hi + 1, 2):
        x = x_of(10.0 ** p)
        d.line([x, top - 6, x, top + row_h * len(rows)], fill=(228, 228, 228))
        label = f"1e{p}"
        d.text((x - d.textlength(label, font=small) / 2, top - 20), label, fill=fig.BLACK, font=small)
    xt = x_of(TOL)
    for y in range(top - 6, top + row_h * len(rows), 6):
        d.line([xt, y, xt, y + 3], fill=(90, 90, 90), width=2)
    for i, (layer, config, tensor, err, result) in enumerate(rows):
        y = top + i * row_h
        label = f"{layer} {config}".strip() + f": {tensor}"
        if d.textlength(label, font=f) > label_w - 16:
            while d.textlength(label + "...", font=f) > label_w - 16:
                label = label[:-1]
            label += "..."
        colour = (214, 39, 40) if result == "FAIL" else (
            (44, 160, 44) if layer in ("LeakyReLU", "Conv1x1", "Conv1x1Wrong") else (31, 119, 180))
        d.text((8, y + 1), label, fill=colour if result == "FAIL" else fig.BLACK, font=f)
        d.rectangle([label_w, y + 3, x_of(err), y + row_h - 3], fill=colour)
    y = top + row_h * len(rows) + 10
    for colour, name in (((31, 119, 180), "built-in layer (run_suite)"), ((44, 160, 44), "layers written in this example"),
                         ((214, 39, 40), "FAIL: Conv1x1Wrong (W instead of W^T)")):
        d.rectangle([10, y + 3, 22, y + 13], fill=colour)
        d.text((28, y), name, fill=fig.BLACK, font=f)
        y += 17
    return fig.save(image, path_dir, "gradcheck.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="random-direction checks only (for tests)")
    parser.add_argument("--out", default="runs/examples", help="folder for gradcheck.png")
    args = parser.parse_args(argv)
    mode = "random" if args.quick else "elementwise"

    rows, suite_passed = run_suite(mode=mode, tol=TOL)
    print(f"built-in layers ({mode} mode): {len(rows)} tensors, "
          f"{'all passed' if suite_passed else 'SOME FAILED'}; worst relative error {max(r[3] for r in rows):.1e}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 5))
    x += np.sign(x) * 0.1  # away from LeakyReLU's kink
    reports = {}
    for name, layer in (("LeakyReLU", LeakyReLU(0.1)), ("Conv1x1", Conv1x1(3, 3)), ("Conv1x1Wrong", Conv1x1Wrong(3, 3))):
        report = check_layer(layer, x, mode="elementwise", tol=TOL, name=name)
        print()
        print(report)
        reports[name] = report
        rows += [(name, "", t.name, t.max_rel_err, "ok" if t.passed else "FAIL") for t in report.tensors]
    wrong = [t for t in reports["Conv1x1Wrong"].tensors if not t.passed]
    print()
    for t in wrong:
        print(f"caught: Conv1x1Wrong {t.name} FAIL, max relative error {t.max_rel_err:.2f} at index {tuple(int(i) for i in t.worst_index)}")
    print(f"wrote {draw(rows, args.out)}")
    ok = suite_passed and reports["LeakyReLU"].passed and reports["Conv1x1"].passed and [t.name for t in wrong] == ["input"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
