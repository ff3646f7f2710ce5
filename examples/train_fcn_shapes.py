"""Train a small FCN on the built-in shapes dataset: a thin wrapper over minifcn.train.train(TrainConfig(...)).

Everything is in the TrainConfig; train() validates the data, runs SGD, and
after every epoch writes into --out: metrics.jsonl, checkpoint.npz, best.npz,
loss.png (loss and mean IU curves) and predictions.png (image | ground truth |
prediction | overlay on held-out images). The same run from the command line is
`minifcn train --out runs/examples/train_fcn_shapes`. Like every example it
writes only under runs/examples/ (by default runs/examples/train_fcn_shapes,
and runs/examples/train_fcn_shapes-quick for --quick), never into the run
folder of the README's main command.

    python examples/train_fcn_shapes.py [--quick] [--out DIR] [--model fcn8s] [--epochs N]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import minifcn  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, ROOT)

from minifcn.train import TrainConfig, load_model, train  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short epoch on a few small images (for tests)")
    parser.add_argument("--out", default=None,
                        help="run folder (default: runs/examples/train_fcn_shapes, with --quick ...-quick)")
    parser.add_argument("--model", default="fcn8s", help="fcn32s, fcn16s, fcn8s, fcn8s-atonce or encoder-decoder")
    parser.add_argument("--width", type=float, default=0.125, help="channel multiplier (1.0 = the paper's VGG16)")
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's (quick: 1)")
    parser.add_argument("--lr", type=float, default=None, help="default: TrainConfig's")
    parser.add_argument("--device", default="cpu", help="cpu or gpu")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files of an earlier run in --out")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = "runs/examples/train_fcn_shapes" + ("-quick" if args.quick else "")

    d = TrainConfig()
    cfg = TrainConfig(model=args.model, width=args.width, out=args.out, device=args.device,
                      epochs=args.epochs or d.epochs, lr=args.lr or d.lr, progress=not args.quick,
                      overwrite=args.overwrite)
    if args.quick:  # seconds, not minutes: the loop, the checkpoints and the pictures, not a useful model
        cfg = TrainConfig(model=args.model, width=args.width, out=args.out, device=args.device,
                          epochs=args.epochs or 1, lr=args.lr or d.lr, image_size=48, train_images=4,
                          val_images=2, batch_size=2, num_preview=2, progress=False, overwrite=args.overwrite)
    start = time.perf_counter()
    history = train(cfg)
    last = history[-1]
    print(f"trained {cfg.model} for {len(history)} epoch(s) in {time.perf_counter() - start:.0f} s: "
          f"final train loss {last['train_loss']:.4f}, pixel accuracy {last['pixel_acc']:.4f}, "
          f"mean IU {last['mean_iu']:.4f}")
    model, meta = load_model(os.path.join(cfg.out, "best.npz"))  # what `minifcn predict/eval` would load
    print(f"best.npz: {type(model).__name__} from epoch {meta['epoch'] + 1}, classes {', '.join(meta['class_names'])}")
    for name in ("predictions.png", "loss.png"):
        print(f"wrote {os.path.join(cfg.out, name)}")
    return 0 if math.isfinite(last["train_loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
