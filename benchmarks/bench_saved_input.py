"""What checking a convolution's saved input costs (minifcn.layers._checks.SavedInput).

Times, interleaved, one training step of the default small FCN-8s (width
0.125, 6 classes, one 128 x 128 image) with the check and with it replaced by
a plain reference, then the check alone and the alternative it replaced (a
full sum of every saved input, forward and backward), over the 21 inputs the
model's convolutions keep. Run: ``python benchmarks/bench_saved_input.py``.
"""
from __future__ import annotations

import argparse

import common  # noqa: F401  (before NumPy: OpenBLAS settings)
import numpy as np

import minifcn.layers.conv as conv_module
from minifcn.layers import Conv2d, ConvTranspose2d, SoftmaxCrossEntropy
from minifcn.layers._checks import SavedInput
from minifcn.models import build_model
from minifcn.optim import SGD


class Unchecked:
    """SavedInput without the check: the reference the layer kept before."""

    def __init__(self, x):
        self.array = x

    def check(self, layer):
        return self.array


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="a 32 x 32 image and 2 rounds (for the tests)")
    args = parser.parse_args(argv)
    size, rounds = (32, 2) if args.quick else (128, args.rounds)
    model = build_model("fcn8s", num_classes=6, width=0.125, seed=0, dropout=0.0)
    model.input_grad = False
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 6, (1, size, size))
    loss, optimizer = SoftmaxCrossEntropy(), SGD(model, lr=1e-3)

    def step():
        model.zero_grad()
        loss(model(x), labels)
        model.backward(loss.backward())
        optimizer.step()

    def unchecked_step():
        conv_module.SavedInput = Unchecked
        try:
            step()
        finally:
            conv_module.SavedInput = SavedInput

    step()
    saved = [m._cache[0].array for m in model.modules() if isinstance(m, (Conv2d, ConvTranspose2d))]
    timings = common.interleaved({
        "training step, inputs checked": step,
        "training step, unchecked": unchecked_step,
        "SavedInput + check, all inputs": lambda: [SavedInput(a).check("bench") for a in saved],
        "full sums, forward and backward": lambda: [a.sum() + a.sum() for a in saved],
    }, rounds=rounds, warmup=1, min_sample_s=0.05)
    print("machine:", common.machine_line())
    print(f"FCN-8s width 0.125, one {size} x {size} image; {len(saved)} saved inputs, "
          f"{sum(a.size for a in saved) / 1e6:.2f} M floats; {rounds} interleaved rounds\n")
    base = timings["training step, unchecked"].median
    common.print_table(["what", "median ms", "min ms", "of an unchecked step"],
                       [(name, t.median * 1e3, t.min * 1e3, f"{100 * t.median / base:.2f} %")
                        for name, t in timings.items()], formats=[None, ".3f", ".3f", None])


if __name__ == "__main__":
    main()
