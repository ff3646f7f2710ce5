"""Before/after: one training step of the default ``minifcn train`` recipe, at an
older commit and in the working tree, interleaved round by round in one process.

The older package is extracted with ``git archive`` into a temporary folder
and imported as ``minifcn_before`` (the package uses relative imports only),
so both versions see the same machine state in every round: on a shared,
noisy machine only such paired ratios mean anything.

    python benchmarks/bench_before_after.py --before a0c57c3 --rounds 40
    python benchmarks/bench_before_after.py --before 3a61c02 --batch-size 8 --image-size 64
    python benchmarks/bench_before_after.py --before caf3d8c --width 1 --image-size 224 --crop-size 0 --rounds 5

Both sides use the working tree's defaults for the batch size, image size and
training crop unless given (an older default would otherwise change the work, not the code).
"""
from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402, F401  (before NumPy: OpenBLAS's idle threads sleep, as in minifcn)
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def extract(revision: str, folder: str, name: str = "minifcn_before") -> None:
    """Write the ``minifcn`` package of ``revision`` to ``folder/name``."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", revision, "minifcn"],
                             check=True, capture_output=True).stdout
    tar_path = os.path.join(folder, "before.tar")
    with open(tar_path, "wb") as f:
        f.write(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(folder, filter="data")
    if name != "minifcn":
        os.rename(os.path.join(folder, "minifcn"), os.path.join(folder, name))


def training_step(package: str, batch_size: int, image_size: int, crop_size: int | None = None, batches: int = 32,
                  width: float | None = None):
    """A closure running one step of the default recipe (model, loss, SGD) of ``package`` on batches of
    ``image_size`` images, cut to random ``crop_size`` crops when given (None: whole images), with the
    model at ``width`` (None: the default). The crop is the caller's, not the package's default, so two
    versions timed side by side do the same work.

    The rate follows the recipe's schedule, warm-up included, where the version has one (the full rate from
    the first step sits at the edge: one sweep overflowed at step 104 and went on in NaN, and a NaN map has no
    repeated lines, so the data-dependent routes then timed other work); a non-finite loss stops the benchmark."""
    train = importlib.import_module(package + ".train")
    optim = importlib.import_module(package + ".optim")
    extra = {} if width is None else {"width": width}
    cfg = train.TrainConfig(batch_size=batch_size, image_size=image_size, **extra)
    train_set, _ = train.make_datasets(cfg)
    model = train.build_from_config(cfg, train_set.num_classes)
    if hasattr(type(model), "input_grad"):  # as `minifcn train` does, where the version has it
        model.input_grad = False
    opt = optim.SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = train.make_loss(model, cfg.reduction)
    loader = train.DataLoader(train_set, cfg.batch_size, shuffle=True, seed=0, crop_size=crop_size,
                              flip=cfg.flip, drop_last=True, mean=train.IMAGENET_MEAN_RGB, bgr=cfg.bgr,
                              scale=cfg.input_scale)
    data = [b for _, b in zip(range(batches), loader.epoch(0))]
    schedule = None
    if hasattr(optim, "make_schedule") and getattr(cfg, "warmup", 0):
        steps_of_run = max(1, cfg.epochs * len(train_set) // batch_size)
        schedule = optim.make_schedule(cfg.schedule, cfg.lr, steps_of_run, power=cfg.poly_power, warmup=cfg.warmup)
    taken = [0]

    def step(i):
        images, labels = data[i % len(data)]
        if schedule is not None:
            opt.lr = schedule(taken[0])
        model.zero_grad()
        loss = float(loss_fn(model(images), labels))
        if not np.isfinite(loss):
            raise FloatingPointError(f"{package}: the benchmark's training diverged (loss {loss}) at step "
                                     f"{taken[0]}; later steps would time other work")
        model.backward(loss_fn.backward())
        opt.step()
        taken[0] += 1

    step.model, step.optimizer, step.batches = model, opt, data  # for the tests
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default="HEAD", help="git revision to compare the working tree with")
    p.add_argument("--rounds", type=int, default=30)
    defaults = importlib.import_module("minifcn.train").TrainConfig()
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--crop-size", type=int, default=None,
                   help="training crops' side, the same for both versions (default: the working tree's "
                        "training_crop for that image size; 0: whole images)")
    p.add_argument("--width", type=float, default=defaults.width,
                   help="channel multiplier of the model (1.0: the paper's VGG16)")
    args = p.parse_args(argv)
    train_module = importlib.import_module("minifcn.train")
    crop = train_module.training_crop(train_module.TrainConfig(image_size=args.image_size, crop_size=args.crop_size))
    with tempfile.TemporaryDirectory() as folder:
        extract(args.before, folder)
        sys.path.insert(0, folder)
        steps = {name: training_step(package, args.batch_size, args.image_size, crop, width=args.width)
                 for name, package in (("before", "minifcn_before"), ("after", "minifcn"))}
        for step in steps.values():  # warm-up: buffers, caches
            for i in range(3):
                step(i)
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step(r)
                times[name].append(time.perf_counter() - t0)
    before, after = (np.array(times[k]) for k in ("before", "after"))
    work = f"{args.image_size}^2" + (f", random {crop}^2 crops" if crop else "") + f", width {args.width:g}"
    print(f"training step of the default recipe (batch {args.batch_size} x {work}), "
          f"{args.rounds} interleaved rounds: "
          f"before ({args.before}) {1e3 * np.median(before):.0f} ms, after (working tree) "
          f"{1e3 * np.median(after):.0f} ms, median per-round ratio {np.median(after / before):.2f}")


if __name__ == "__main__":
    main()
