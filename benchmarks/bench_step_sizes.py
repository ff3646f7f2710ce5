"""What a training step of the default recipe costs per image, by image side and batch size.

The recipe's levers "smaller training images (crops)" and "larger batches" only
buy time if a step's cost falls with them. FCN's padding of 100 puts conv1 on a
(side + 198)^2 map whatever the image side, so this measures it instead of
assuming it: one step of the default model, loss and SGD (``TrainConfig``) at
each (batch, side), interleaved round by round, medians.

    python benchmarks/bench_step_sizes.py
    python benchmarks/bench_step_sizes.py --sides 128,96,64 --batches 1,2 --rounds 9
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_before_after import training_step  # noqa: E402
from common import interleaved, machine_line, print_table  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="128,96,80,64", help="comma list of image sides")
    p.add_argument("--batches", default="1,2", help="comma list of batch sizes")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    sides = [int(v) for v in args.sides.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    print(machine_line())
    cases = {}
    for batch in batches:
        for side in sides:
            step, count = training_step("minifcn", batch, side, crop_size=None), [0]  # whole images of this side

            def one(step=step, count=count):
                step(count[0])
                count[0] += 1

            cases[(batch, side)] = one
    timing = interleaved(cases, rounds=args.rounds, warmup=2)
    base = timing[(batches[0], sides[0])].median / batches[0]
    rows = [(f"{b} x {s}^2", 1e3 * t.median, 1e3 * t.median / b, t.median / b / base)
            for (b, s), t in timing.items()]
    print(f"\none training step of the default recipe, medians of {args.rounds} interleaved rounds")
    print_table(["batch x side", "ms / step", "ms / image", f"per image vs {batches[0]} x {sides[0]}^2"], rows,
                [None, ".1f", ".1f", ".2f"])


if __name__ == "__main__":
    main()
