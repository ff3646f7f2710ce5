"""Layer benchmark: minifcn's Conv2d, ConvTranspose2d and MaxPool2d at VGG16/FCN shapes.

Prints, for each layer, the median time of a forward pass and of a forward
plus backward pass (batch 1, float32) and the GFLOP/s they reach. When
PyTorch is installed, the same operations through ``torch.nn.functional``
run in the same process, interleaved round by round with minifcn's, and
the table adds PyTorch's times and the ratio minifcn / PyTorch (above 1:
minifcn is slower). The ratio is the median of the per-round ratios: each
round runs both libraries back to back, so a slow spell of a shared machine
hits both sides of a ratio alike.

What is timed:
    fwd      ``layer.forward(x)`` / the torch op under ``torch.no_grad()``.
    fwd+bwd  ``layer.forward(x); layer.backward(dy)`` / the op with autograd
             and ``y.backward(dy)``. Both compute the input gradient and the
             weight gradient (added into an existing ``.grad``), and the bias
             gradient where there is a bias.
FLOPs: a multiply-add is 2; forward+backward of a convolution is 3x its
forward (input gradient and weight gradient each cost one forward).

Usage:
    python benchmarks/bench_layers.py                 # full shapes, 7 rounds
    python benchmarks/bench_layers.py --quick         # small shapes, 2 rounds (smoke test)
    python benchmarks/bench_layers.py --only conv1_2,upscore --repeats 11
    python benchmarks/bench_layers.py --markdown      # the table as Markdown
    python benchmarks/bench_layers.py --threads 1     # NumPy's BLAS and PyTorch on one thread
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import common  # noqa: E402  (first: sets the OpenBLAS environment before NumPy loads)
import numpy as np  # noqa: E402

from minifcn.layers import Conv2d, ConvTranspose2d, MaxPool2d  # noqa: E402


@dataclass
class Case:
    """One benchmark row.

    kind: "conv", "deconv" or "pool"; (cin, cout, k, stride, pad) as in
    PyTorch; hw: the input's height = width.
    """
    name: str
    kind: str
    cin: int
    cout: int
    k: int
    stride: int
    pad: int
    hw: int
    bias: bool = True
    ceil_mode: bool = False

    def describe(self) -> str:
        if self.kind == "pool":
            return f"max {self.k}x{self.k} s{self.stride}{' ceil' if self.ceil_mode else ''}"
        kind = "conv" if self.kind == "conv" else "convT"
        pad = f" p{self.pad}" if self.pad else ""
        bias = "" if self.bias else " nobias"
        return f"{kind} {self.cin}->{self.cout} k{self.k} s{self.stride}{pad}{bias}"

    def input_shape(self):
        return (1, self.cin, self.hw, self.hw)


def cases(quick: bool):
    """FCN-8s (VGG16, padding 100) shapes at a 224 x 224 image, or smaller ones for --quick."""
    if not quick:
        return [
            Case("conv1_1", "conv", 3, 64, 3, 1, 100, 224),        # FCN's padding 100: 422 x 422 out
            Case("conv1_2", "conv", 64, 64, 3, 1, 1, 224),
            Case("conv3_2", "conv", 256, 256, 3, 1, 1, 56),
            Case("conv5_2", "conv", 512, 512, 3, 1, 1, 14),
            Case("fc6", "conv", 512, 4096, 7, 1, 0, 14),           # pool5 of FCN-8s at 224: 14 x 14 -> 8 x 8
            Case("upscore2", "deconv", 21, 21, 4, 2, 0, 18, bias=False),    # upscore_pool4 of FCN-8s at 224
            Case("upscore8", "deconv", 21, 21, 16, 8, 0, 38, bias=False),   # FCN-8s final upsampling at 224
            Case("upscore32", "deconv", 21, 21, 64, 32, 0, 16, bias=False),  # FCN-32s at ~500 x 500
            Case("pool1", "pool", 64, 64, 2, 2, 0, 422, ceil_mode=True),  # FCN's conv1 at 422 x 422
            Case("pool4", "pool", 512, 512, 2, 2, 0, 53, ceil_mode=True),  # odd size: ceil mode matters
        ]
    return [
        Case("conv1_1", "conv", 3, 64, 3, 1, 100, 24),
        Case("conv1_2", "conv", 64, 64, 3, 1, 1, 56),
        Case("conv3_2", "conv", 128, 128, 3, 1, 1, 28),
        Case("conv5_2", "conv", 256, 256, 3, 1, 1, 14),
        Case("fc6", "conv", 128, 512, 7, 1, 0, 14),
        Case("upscore2", "deconv", 21, 21, 4, 2, 0, 8, bias=False),
        Case("upscore8", "deconv", 21, 21, 16, 8, 0, 10, bias=False),
        Case("upscore32", "deconv", 21, 21, 64, 32, 0, 4, bias=False),
        Case("pool1", "pool", 64, 64, 2, 2, 0, 112, ceil_mode=True),
        Case("pool4", "pool", 512, 512, 2, 2, 0, 27, ceil_mode=True),
    ]


def build_minifcn(case: Case, rng):
    if case.kind == "conv":
        return Conv2d(case.cin, case.cout, case.k, case.stride, case.pad, bias=case.bias, rng=rng)
    if case.kind == "deconv":
        return ConvTranspose2d(case.cin, case.cout, case.k, case.stride, case.pad, bias=case.bias, rng=rng)
    return MaxPool2d(case.k, case.stride, case.pad, ceil_mode=case.ceil_mode)


def forward_flops(case: Case, out_shape) -> float:
    if case.kind == "conv":
        return common.conv_flops(1, case.cin, case.cout, out_shape[2], out_shape[3], case.k, case.k)
    if case.kind == "deconv":
        return common.conv_transpose_flops(1, case.cin, case.cout, case.hw, case.hw, case.k, case.k)
    return float("nan")  # pooling: comparisons, not FLOPs


def torch_candidates(torch, case: Case, layer, x, dy):
    """Forward and forward+backward closures of the same op through torch.nn.functional."""
    F = torch.nn.functional
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    dyt = torch.from_numpy(dy.copy())
    params = []
    if case.kind == "pool":
        def op(inp):
            return F.max_pool2d(inp, case.k, case.stride, case.pad, ceil_mode=case.ceil_mode)
    else:
        wt = torch.from_numpy(layer.weight.data.copy()).requires_grad_(True)
        bt = torch.from_numpy(layer.bias.data.copy()).requires_grad_(True) if layer.bias is not None else None
        params = [p for p in (wt, bt) if p is not None]
        conv = F.conv2d if case.kind == "conv" else F.conv_transpose2d

        def op(inp):
            return conv(inp, wt, bt, stride=case.stride, padding=case.pad)

    def fwd():
        with torch.no_grad():
            op(xt)

    def fwd_bwd():
        xt.grad = None  # a fresh input gradient, as minifcn returns; weight grads accumulate, as minifcn's
        op(xt).backward(dyt)

    with torch.no_grad():
        reference = op(xt).numpy()
    for p in params:  # allocate .grad once, so every timed call accumulates in place
        p.grad = torch.zeros_like(p)
    return fwd, fwd_bwd, reference


def run_case(case: Case, torch, rounds: int, warmup: int, rng, min_sample_s: float = 0.02):
    layer = build_minifcn(case, rng)
    x = rng.standard_normal(case.input_shape(), dtype=np.float32)
    y = layer.forward(x)
    assert y.dtype == np.float32, f"{case.name}: output dtype {y.dtype}"
    dy = rng.standard_normal(y.shape, dtype=np.float32)
    dx = layer.backward(dy)
    assert dx.dtype == np.float32, f"{case.name}: input-gradient dtype {dx.dtype}"
    del dx

    def mf_fwd():
        layer.forward(x)

    def mf_fwd_bwd():
        layer.forward(x)
        layer.backward(dy)

    cands = {"mf_fwd": mf_fwd}
    if torch is not None:
        t_fwd, t_fwd_bwd, reference = torch_candidates(torch, case, layer, x, dy)
        err = float(np.max(np.abs(reference - y)) / max(float(np.max(np.abs(reference))), 1e-30))
        if not err < 1e-4:
            print(f"WARNING: {case.name}: minifcn and PyTorch outputs differ (max rel err {err:.2e})",
                  file=sys.stderr)
        cands["torch_fwd"] = t_fwd
    cands["mf_fwd_bwd"] = mf_fwd_bwd
    if torch is not None:
        cands["torch_fwd_bwd"] = t_fwd_bwd
    del y
    t = common.interleaved(cands, rounds=rounds, warmup=warmup, min_sample_s=min_sample_s)
    flops = forward_flops(case, layer.output_shape(x.shape) if case.kind != "pool" else None)
    return t, flops


def paired_ratio(a, b) -> float:
    """Median over rounds of a's time / b's time in the same round."""
    return float(np.median([x / y for x, y in zip(a.samples, b.samples)]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per layer (default 7, --quick 2)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="untimed calls of each candidate first (default 1, --quick 0)")
    ap.add_argument("--quick", action="store_true", help="small shapes and few rounds: a smoke test")
    ap.add_argument("--only", default=None, metavar="NAME",
                    help="comma-separated row names or parts of names (e.g. conv1_2,upscore)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for NumPy's BLAS and PyTorch (default: what the BLAS uses, normally all cores)")
    ap.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch even if installed")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rounds = args.repeats or (2 if args.quick else 7)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)
    if rounds < 1 or warmup < 0:
        ap.error("--repeats must be at least 1 and --warmup at least 0")

    selected = cases(args.quick)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        selected = [c for c in selected if any(w == c.name or w in c.name for w in wanted)]
        if not selected:
            ap.error(f"--only {args.only!r} matches no row; rows: {', '.join(c.name for c in cases(args.quick))}")

    if args.threads is not None:
        if args.threads < 1:
            ap.error("--threads must be at least 1")
        if not common.set_blas_threads(args.threads):
            print("warning: could not set the BLAS thread count; set OPENBLAS_NUM_THREADS instead", file=sys.stderr)
    torch = None if args.no_torch else common.import_torch(args.threads)
    t_start = time.perf_counter()
    print(f"machine: {common.machine_line(torch)}")
    ceiling = common.sgemm_gflops(n=1024 if args.quick else 2048, rounds=2 if args.quick else 5)  # quick: a sanity value only
    print(f"float32 matrix-product ceiling: {ceiling['median_gflops']:.0f} GFLOP/s "
          f"({ceiling['n']}^3 sgemm, median of {2 if args.quick else 5}; best {ceiling['max_gflops']:.0f})")
    print(f"batch 1, float32; median of {rounds} interleaved rounds after {warmup} warm-up; "
          f"times in ms" + ("; ratio = minifcn / PyTorch, median of per-round ratios" if torch is not None
                            else " (no PyTorch comparison: " + ("--no-torch)" if args.no_torch else "not installed)")))
    print(flush=True)

    headers = ["layer", "op", "input", "GFLOP", "fwd ms", "GFLOP/s"]
    formats = [None, None, None, None, ".2f", ".0f"]
    if torch is not None:
        headers += ["torch ms", "ratio"]
        formats += [".2f", ".2f"]
    headers += ["fwd+bwd ms", "GFLOP/s"]
    formats += [".2f", ".0f"]
    if torch is not None:
        headers += ["torch ms", "ratio"]
        formats += [".2f", ".2f"]

    rng = np.random.default_rng(args.seed)
    rows = []
    for case in selected:
        t, flops = run_case(case, torch, rounds, warmup, rng, min_sample_s=0.0 if args.quick else 0.02)
        shape = "x".join(str(s) for s in case.input_shape()[1:])
        fwd, fb = t["mf_fwd"].median, t["mf_fwd_bwd"].median
        row = [case.name, case.describe(), shape, flops / 1e9, 1e3 * fwd, common.gflops(flops, fwd)]
        if torch is not None:
            row += [1e3 * t["torch_fwd"].median, paired_ratio(t["mf_fwd"], t["torch_fwd"])]
        row += [1e3 * fb, common.gflops(3 * flops, fb)]
        if torch is not None:
            row += [1e3 * t["torch_fwd_bwd"].median, paired_ratio(t["mf_fwd_bwd"], t["torch_fwd_bwd"])]
        rows.append(row)
        if not args.markdown:
            print(f"  {case.name} done", file=sys.stderr, flush=True)

    common.print_table(headers, rows, formats, markdown=args.markdown)
    print()
    if not args.quick:
        after = common.sgemm_gflops(n=2048, rounds=5)
        print(f"float32 matrix-product ceiling after the run: {after['median_gflops']:.0f} GFLOP/s "
              f"(a large change means the shared machine's speed moved during the run)")
    print(f"peak RSS {common.peak_rss_mb():.0f} MiB; wall {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
