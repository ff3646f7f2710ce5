"""Staged training, as in the FCN paper: FCN-32s, then FCN-16s from it, then FCN-8s from that, coarse to fine.

Each stage is `minifcn train` with --init-from the previous stage's best.npz
(every parameter whose name and shape match is copied: the backbone, score_fr,
and for FCN-8s also upscore2 and score_pool4; the new skip layers start at zero,
so a stage begins by predicting what the one before it predicted). The same
three runs from the command line:

    minifcn train --model fcn32s --epochs 4 --out runs/examples/staged/fcn32s
    minifcn train --model fcn16s --epochs 2 --lr 0.005 --init-from runs/examples/staged/fcn32s/best.npz --out runs/examples/staged/fcn16s
    minifcn train --model fcn8s  --epochs 2 --lr 0.005 --init-from runs/examples/staged/fcn16s/best.npz --out runs/examples/staged/fcn8s

Then draws, for the same held-out images, image | ground truth | the three
models' predictions side by side, each titled with the mean IU its own run
measured on the held-out split (staged_refinement.png in --out). With
--from-runs it trains nothing and draws the runs already in --out.

    python examples/staged_training.py [--quick] [--out DIR] [--from-runs]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _figure as fig  # noqa: E402  (also makes minifcn importable from a checkout)
import numpy as np  # noqa: E402

from minifcn.data import IMAGENET_MEAN_RGB, ShapesDataset, to_tensor  # noqa: E402
from minifcn.train import TrainConfig, load_model, predict_labels, train  # noqa: E402
from minifcn.viz import colorize, voc_palette  # noqa: E402

# (model, epochs, learning rate) of each stage; each later stage starts from the one before it
STAGES = (("fcn32s", 4, 0.01), ("fcn16s", 2, 0.005), ("fcn8s", 2, 0.005))
QUICK = dict(width=1 / 32, image_size=32, train_images=4, val_images=2, batch_size=2, num_preview=1)


def train_stages(out, quick, overwrite=False):
    """Train the three stages into out/<model>/; returns their best.npz paths."""
    paths, previous = [], None
    for model, epochs, lr in STAGES:
        cfg = TrainConfig(model=model, epochs=1 if quick else epochs, lr=lr, out=os.path.join(out, model),
                          init_from=previous, progress=not quick, overwrite=overwrite, **(QUICK if quick else {}))
        start = time.perf_counter()
        history = train(cfg)
        print(f"{model}: trained in {time.perf_counter() - start:.0f} s, last epoch mean IU {history[-1]['mean_iu']:.3f}")
        previous = os.path.join(cfg.out, "best.npz")
        paths.append(previous)
    return paths


def measured_mean_iu(meta):
    """The held-out mean IU of the epoch a best.npz was saved at, as its run measured it."""
    return meta["history"][meta["epoch"]]["mean_iu"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny stages of one epoch each (for tests)")
    parser.add_argument("--out", default=None,
                        help="folder of the three runs and the figure (default: runs/examples/staged, "
                             "with --quick runs/examples/staged-quick)")
    parser.add_argument("--from-runs", action="store_true", help="train nothing: draw the runs already in --out")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files of earlier runs in --out")
    parser.add_argument("--images", type=int, default=4, help="held-out images in the figure")
    args = parser.parse_args(argv)
    out = args.out or ("runs/examples/staged-quick" if args.quick else "runs/examples/staged")

    paths = ([os.path.join(out, m, "best.npz") for m, _, _ in STAGES] if args.from_runs
             else train_stages(out, args.quick, args.overwrite))
    models = [load_model(p) for p in paths]
    cfgs = [TrainConfig.from_dict(meta["config"]) for _, meta in models]
    for (model, meta), cfg, (name, _, _) in zip(models, cfgs, STAGES):
        if cfg.model != name:
            parser.error(f"{out}/{name}/best.npz holds a {cfg.model}, not a {name}")
        if cfg.image_size != cfgs[0].image_size or cfg.seed != cfgs[0].seed:
            parser.error("the three runs were trained on different shapes images (image size or seed differ)")
        model.eval()
    ious = [measured_mean_iu(meta) for _, meta in models]
    for (name, _, _), cfg, (_, meta), iu in zip(STAGES, cfgs, models, ious):
        print(f"{name}: mean IU {iu:.4f} on {cfg.val_images} held-out images (epoch {meta['epoch'] + 1} of its run, "
              f"{cfg.epochs} epochs, lr {cfg.lr:g}, init from {cfg.init_from or 'scratch'})")

    cfg = cfgs[0]
    val = ShapesDataset("val", min(args.images, cfg.val_images), cfg.image_size, seed=cfg.seed)
    scale = max(1, round(128 / cfg.image_size))
    tile = (cfg.image_size * scale, cfg.image_size * scale)
    rows = []
    for i in range(len(val)):
        image, label = val[i]
        x = np.ascontiguousarray(to_tensor(image, mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale)[None])
        preds = [predict_labels(model, x)[0].astype(np.uint8) for model, _ in models]
        rows.append([fig.enlarge(image, tile, nearest=False), fig.enlarge(colorize(label), tile)]
                    + [fig.enlarge(colorize(p), tile) for p in preds])
    names = models[0][1]["class_names"]
    titles = ["held-out image", "ground truth"] + [f"FCN-{n[3:]}: mean IU {iu:.3f}" for (n, _, _), iu in zip(STAGES, ious)]
    recipe = ", then ".join(f"{c.model} {c.epochs} epoch{'s' * (c.epochs != 1)} at lr {c.lr:g}" for c in cfgs)
    caption = (f"Staged training on shapes ({cfg.image_size} px, {cfg.train_images} training images, width "
               f"{cfg.width:g}): {recipe},\neach stage initialised from the one before it (--init-from). "
               f"Mean IU: measured by each model's own run on the {cfg.val_images} held-out images.")
    palette = voc_palette()
    parts = [fig.compose(rows[:1], titles=[titles], title_h=20, pad=8)]
    if len(rows) > 1:  # the other images without a title band
        parts.append(fig.compose(rows[1:], title_h=0, pad=8))
    parts += [fig.compose([[fig.legend([(palette[c], n) for c, n in enumerate(names)])]], title_h=0, caption=caption,
                          pad=8)]
    image = fig.stack(parts)
    print(f"wrote {fig.save(image, out, 'staged_refinement.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
