"""What each stage of an FCN-8s predicts: the coarse stream (32s), after fusing pool4 (16s), and the output (8s).

Trains a small FCN-8s on the built-in shapes dataset with
minifcn.train.train(TrainConfig(...)) (or loads --checkpoint), then splits its
output into the three streams it adds (minifcn.explain.fcn8s_streams):
A from score_fr (stride 32), B from pool4 (stride 16), C from pool3 (stride 8).
Draws, for held-out images, input | ground truth | the prediction after each
stage (32s = A, 16s = A + B, 8s = A + B + C), and under them the foreground
evidence each stream contributes (fcn_stages.png in --out). Prints every
stage's pixel accuracy and mean IU.

    python examples/fcn_stages.py [--quick] [--out DIR] [--checkpoint best.npz]
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
from minifcn.explain import fcn8s_stage_scores, fcn8s_streams  # noqa: E402
from minifcn.metrics import ConfusionMatrix  # noqa: E402
from minifcn.train import TrainConfig, load_model, train  # noqa: E402
from minifcn.viz import colorize, voc_palette  # noqa: E402

STAGES = ("32s", "16s", "8s")
BLOBS = {"32s": "score_fr", "16s": "fuse_pool4", "8s": "output"}


def train_model(args):
    """Train an FCN-8s (width 0.125) on shapes; returns the path of its best checkpoint."""
    if args.quick:  # the pipeline in seconds; the model is untrained and its picture meaningless
        cfg = TrainConfig(model="fcn8s", width=0.125, out=args.run_dir, epochs=1, image_size=48, train_images=4,
                          val_images=2, batch_size=2, num_preview=1, progress=False, dropout=0.0,
                          overwrite=args.overwrite)
    else:
        cfg = TrainConfig(model="fcn8s", width=0.125, out=args.run_dir, epochs=args.epochs,
                          image_size=args.image_size, train_images=args.train_images, val_images=16, batch_size=4,
                          lr=args.lr, dropout=0.0, progress=True, overwrite=args.overwrite)
    start = time.perf_counter()
    history = train(cfg)
    print(f"trained in {time.perf_counter() - start:.0f} s; last epoch: mean IU {history[-1]['mean_iu']:.3f}")
    return os.path.join(cfg.out, "best.npz")


def foreground_evidence(scores):
    """(K, H, W) class scores -> (H, W): logsumexp of the object classes minus the background score."""
    fg = scores[1:]
    top = fg.max(axis=0)
    return top + np.log(np.exp(fg - top).sum(axis=0)) - scores[0]


def softmax(scores):
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few seconds of training (for tests)")
    parser.add_argument("--out", default="runs/examples", help="folder for fcn_stages.png")
    parser.add_argument("--checkpoint", default=None, help="a trained FCN-8s (best.npz of a run); skips training")
    parser.add_argument("--run-dir", default=None,
                        help="where the training run is written (default: runs/examples/fcn_stages-run, "
                             "with --quick ...-quick)")
    parser.add_argument("--overwrite", action="store_true", help="replace the run files of an earlier run in --run-dir")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-images", type=int, default=320)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--image-size", type=int, default=96,
                        help="shapes image side: 96 gives score_fr 4x4 units, so the 32s stream is visibly coarse")
    parser.add_argument("--images", type=int, default=2, help="held-out images in the figure")
    parser.add_argument("--eval-images", type=int, default=32, help="held-out images for the accuracies")
    args = parser.parse_args(argv)
    if args.run_dir is None:
        args.run_dir = "runs/examples/fcn_stages-run" + ("-quick" if args.quick else "")

    path = args.checkpoint or train_model(args)
    model, meta = load_model(path)
    cfg = TrainConfig.from_dict(meta["config"])
    if type(model).__name__ not in ("FCN8s", "FCN8sAtOnce"):
        parser.error(f"{path} holds a {type(model).__name__}; this example needs an FCN-8s")
    model.eval()
    names = meta["class_names"]
    n_eval = 2 if args.quick else args.eval_images
    val = ShapesDataset("val", max(n_eval, args.images), cfg.image_size, seed=cfg.seed)

    confusion = {s: ConfusionMatrix(len(names)) for s in STAGES}
    shown = []
    max_diff = sum_diff = 0.0
    for i in range(len(val)):
        image, label = val[i]
        x = np.ascontiguousarray(to_tensor(image, mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale)[None])
        scores = fcn8s_stage_scores(model, x)
        a, b, c, output = fcn8s_streams(model, x)
        max_diff = max(max_diff, float(np.abs(scores["8s"] - model(x)).max()))
        sum_diff = max(sum_diff, float(np.abs(a + b + c - output).max() / np.abs(output).max()))
        probs = {s: softmax(scores[s].astype(np.float64))[0] for s in STAGES}
        for s in STAGES:
            confusion[s].update(probs[s].argmax(axis=0), label)
        if i < args.images:
            evidence = [foreground_evidence(t[0].astype(np.float64)) for t in (a, b, c)]
            shown.append((image, label, probs, [e - e.mean() for e in evidence]))
    print(f"8s stage computed layer by layer equals model(x): max |difference| {max_diff:.1e}")
    print(f"output = A (stride 32) + B (stride 16) + C (stride 8): max relative difference {sum_diff:.1e}")
    results = {s: confusion[s].scores() for s in STAGES}
    for s in STAGES:
        print(f"stage {s} ({BLOBS[s]}): pixel accuracy {results[s]['pixel_acc']:.4f}, "
              f"mean IU {results[s]['mean_iu']:.4f} on {len(val)} held-out images")

    # ---- figure: per image, the stage predictions and, under them, what each stream adds
    scale = max(1, round(160 / cfg.image_size))  # an integer magnification: every pixel stays square
    tile = (cfg.image_size * scale, cfg.image_size * scale)
    rows, titles = [], []
    for k, (image, label, probs, evidence) in enumerate(shown):
        rows.append([fig.enlarge(image, tile, nearest=True), fig.enlarge(colorize(label), tile)] +
                    [fig.enlarge(colorize(probs[s].argmax(axis=0).astype(np.uint8)), tile) for s in STAGES])
        titles.append(["input", "ground truth", "32s = A", "16s = A + B", "8s = A + B + C (output)"]
                      if k == 0 else [""] * 5)
        m = max(float(np.percentile(np.abs(e), 99.5)) for e in evidence)  # one scale for the three streams
        rows.append([None, None] + [fig.enlarge(fig.colormap(e, -m, m, diverging=True), tile) for e in evidence])
        titles.append(["", "", "A: from score_fr (stride 32)", "B: from pool4 (stride 16)", "C: from pool3 (stride 8)"]
                      if k == 0 else [""] * 5)
    palette = voc_palette()
    caption = (f"FCN-8s (width 0.125, {cfg.epochs} epochs on shapes, {cfg.image_size} px), held-out images. "
               "The output is a sum of three streams, A + B + C, each upsampled by the network's own layers.\n"
               "Top: the argmax after each stage (a stream left out keeps its mean). Bottom: the foreground "
               "evidence each stream adds (log-odds of 'some object' vs background,\nminus its mean; red: more "
               "object, blue: less; one colour scale per image).\n"
               + ";  ".join(f"{s}: pixel accuracy {results[s]['pixel_acc']:.3f}, mean IU {results[s]['mean_iu']:.3f}"
                            for s in STAGES) + f"  (over {len(val)} held-out images)")
    image = fig.stack([fig.compose(rows, titles=titles, title_h=20, caption=caption, pad=8),
                       fig.legend([(palette[c], n) for c, n in enumerate(names)])], pad=4)
    print(f"wrote {fig.save(image, args.out, 'fcn_stages.png')}")
    return 0 if max_diff == 0.0 and sum_diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
