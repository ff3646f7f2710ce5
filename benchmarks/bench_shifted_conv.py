"""The ``shifted`` convolution routes against the ``bands`` routes they replace, layer by layer.

At stride 1 a convolution computed on the padded width reads, for each of its k*k kernel offsets,
one contiguous slice of the padded input, so it is k*k products with no column buffer
(:func:`minifcn.layers.conv_fast.forward_by_shifted_products` and
:func:`~minifcn.layers.conv_fast.weight_grad_by_shifted_products`; the input gradient is the
``flipped-kernel`` route, a forward convolution that itself takes ``shifted`` or ``bands``).
This script checks each against the textbook route, then times them interleaved on the small
FCN-8s's skinny high-resolution layers at the training recipe's input, for several band budgets.
It is the measurement behind the routes' rule (benchmarks/RESULTS.md, "shifted products").

    python benchmarks/bench_shifted_conv.py                 # conv1_1 ... conv2_2, 1 x 3 x 128 x 128
    python benchmarks/bench_shifted_conv.py --band-kib 160,320,640 --rounds 9
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads (see bench_fcn.py)
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import interleaved, machine_line, print_table  # noqa: E402

from minifcn import routes  # noqa: E402
from minifcn.layers import conv_fast  # noqa: E402
from minifcn.layers.conv_fast import FORWARD, INPUT_GRAD, WEIGHT_GRAD  # noqa: E402
from minifcn.models.trace import fcn_blobs  # noqa: E402
from minifcn.train import TrainConfig, build_from_config  # noqa: E402


def recipe_layers(names):
    """(name, input shape, weight, bias, padding) of the training recipe's model at its input size."""
    cfg = TrainConfig()
    model = build_from_config(cfg, 6)
    order = list(fcn_blobs(model, cfg.image_size))
    index = {b.name: k for k, b in enumerate(order)}
    out = []
    for name in names:
        layer = getattr(model, name)
        src = order[index[name] - 1]
        out.append((name, (cfg.batch_size,) + tuple(src.shape), layer.weight.data, layer.bias.data, layer.geometry))
    return out


@contextlib.contextmanager
def shifted(enabled: bool, band_bytes: int = 0):
    """The ``shifted`` forward route taken at every stride-1 geometry, or never (the input gradient's inner
    forward follows), whatever its channel rule says; and its band budget."""
    entry = next(r for r in routes.routes(FORWARD) if r.name == "shifted")
    applies, budget = entry.applies, conv_fast.SHIFTED_BAND_BYTES["numpy"]
    entry.applies = (lambda u, cout: u.stride == (1, 1)) if enabled else (lambda *facts: False)
    conv_fast.SHIFTED_BAND_BYTES["numpy"] = band_bytes
    try:
        yield
    finally:
        entry.applies, conv_fast.SHIFTED_BAND_BYTES["numpy"] = applies, budget


def rel_err(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="conv1_1,conv1_2,conv2_1,conv2_2")
    p.add_argument("--band-kib", default=f"{conv_fast.SHIFTED_BAND_BYTES['numpy'] >> 10}",
                   help="comma list of the shifted routes' band budgets in KiB of padded input (0: the whole map)")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    budgets = [int(b) << 10 for b in args.band_kib.split(",")]
    print(machine_line())
    rng = np.random.default_rng(0)
    table = []
    for name, x_shape, weight, bias, geom in recipe_layers(args.layers.split(",")):
        x = rng.standard_normal(x_shape).astype(np.float32)
        y = routes.textbook(FORWARD).fn(x, weight, *geom, None, bias)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        passes = {
            "forward": lambda: conv_fast.forward_by_shifted_products(x, weight, *geom, None, bias),
            "weight grad": lambda: conv_fast.weight_grad_by_shifted_products(dy, x, weight.shape, *geom),
            "input grad": lambda: routes.run(INPUT_GRAD, conv_fast.conv_facts(x.shape, weight.shape, *geom),
                                             dy, weight, x.shape, *geom),
        }
        bands = {"forward": lambda: conv_fast.forward_by_bands(x, weight, *geom, None, bias),
                 "weight grad": lambda: conv_fast.weight_grad_by_bands(dy, x, weight.shape, *geom),
                 "input grad": passes["input grad"]}
        textbook = {"forward": lambda: routes.textbook(FORWARD).fn(x, weight, *geom, None, bias),
                    "weight grad": lambda: routes.textbook(WEIGHT_GRAD).fn(dy, x, weight.shape, *geom),
                    "input grad": lambda: routes.textbook(INPUT_GRAD).fn(dy, weight, x.shape, *geom)}
        for what in passes:
            want = textbook[what]()

            def wrap(fn, enabled, budget):
                def call():
                    with shifted(enabled, budget):
                        return fn()
                return call

            candidates = {"bands": wrap(bands[what], False, 0)}
            for budget in budgets:
                fn = wrap(passes[what], True, budget)
                err = rel_err(fn(), want)
                if err > 1e-4:
                    raise AssertionError(f"{name} {what} band {budget >> 10} KiB: shifted differs by {err:.2e}")
                candidates[f"shifted {budget >> 10} KiB" if budget else "shifted, one band"] = fn
            times = interleaved(candidates, rounds=args.rounds, warmup=1)
            base = times["bands"].median
            for cand, t in times.items():
                table.append((name, f"{x_shape[1]}->{weight.shape[0]} at {x_shape[2] + 2 * geom[1][0]}", what, cand,
                              1e3 * t.median, t.median / base))
    print(f"\nstride-1 3x3 convolutions of the training recipe's model (batch 1), medians of {args.rounds} "
          f"interleaved rounds; ratio = candidate / bands route (input grad: flipped-kernel, its inner forward "
          f"by bands or by shifted products)")
    print_table(("layer", "channels at padded side", "what", "route", "ms", "ratio"), table,
                (None, None, None, None, ".2f", ".2f"))


if __name__ == "__main__":
    main()
