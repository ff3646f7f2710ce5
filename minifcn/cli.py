"""The minifcn command line: train, eval, predict, gradcheck, explain.

Run ``minifcn --help``, ``minifcn SUBCOMMAND --help`` or ``python -m minifcn --help``.
``mpiexec -n N minifcn train ...`` trains one model on N processes (docs/data_parallel.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from .distributed import fail, launched_size, world

DESCRIPTION = ("Fully convolutional networks (FCN-32s/16s/8s) written from scratch on NumPy and CuPy. "
               "train, eval and predict with them; gradcheck every layer against central differences; "
               "explain the convolution matrix, output sizes and an FCN layer by layer.")
EPILOG = ("Start with: minifcn train  (a small FCN-8s on the built-in shapes dataset; see README.md). "
          "mpiexec -n N minifcn train ... trains one model on N processes (docs/data_parallel.md).")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default: its value, 'off' for a flag; an option whose default is None
    says what None means in its own help text (``default: ...``), so nothing prints '(default: None)'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default in (None, argparse.SUPPRESS):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: {'on' if action.default else 'off'})"
        return super()._get_help_string(action)


def _parser(sub, name, help_text, **kw):
    return sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                          formatter_class=HelpFormatter, **kw)


def _add_train(sub):
    from .train import TrainConfig  # noqa: PLC0415

    d = TrainConfig()
    p = _parser(sub, "train", "train an FCN (by default a small FCN-8s on the built-in shapes dataset)")
    p.add_argument("--model", default=d.model, help="fcn32s, fcn16s, fcn8s, fcn8s-atonce or encoder-decoder")
    p.add_argument("--dataset", default=d.dataset, help="shapes (built in), voc or folder")
    p.add_argument("--data-dir", default=None, help="root of a VOC or folder dataset (default: none, for shapes)")
    p.add_argument("--out", default=d.out, help="run folder: metrics.jsonl, checkpoints, pictures")
    p.add_argument("--width", type=float, default=d.width, help="channel multiplier (1.0 = the paper's VGG16)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="images per SGD step and rank (the global batch: ranks x batch size)")
    p.add_argument("--ranks", type=int, default=None,
                   help="data-parallel processes of this machine that train one model, each on its own images "
                        "(minifcn.local_ranks; 1: this process alone) (default: minifcn.train.LOCAL_RANKS, 2; "
                        "1 under mpiexec, whose -n gives the ranks)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="base learning rate; with --reduction sum about (pixels per batch) times smaller "
                        "(minifcn.optim.suggest_lr converts)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum (the FCN reference: 0.99)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 penalty on the weights (biases take none)")
    p.add_argument("--reduction", choices=("mean", "sum"), default=d.reduction,
                   help="loss normalisation: per-pixel mean, or the reference's sum (needs a ~pixels-times smaller lr)")
    p.add_argument("--schedule", choices=("constant", "step", "poly"), default=d.schedule,
                   help="learning rate per iteration: constant, step or poly (see minifcn.optim.make_schedule)")
    p.add_argument("--poly-power", type=float, default=d.poly_power, help="poly schedule: lr * (1 - t/T) ** power")
    p.add_argument("--warmup", type=int, default=d.warmup,
                   help="iterations of linear learning-rate warm-up before the schedule (0: none)")
    p.add_argument("--learn-upsampling", action=argparse.BooleanOptionalAction, default=d.learn_upsampling,
                   help="learn the 2x transposed convolutions (CVPR recipe); --no-learn-upsampling keeps all fixed")
    p.add_argument("--dropout", type=float, default=d.dropout, help="drop6/drop7 probability (the reference: 0.5)")
    p.add_argument("--image-size", type=int, default=d.image_size, help="shapes: image side")
    p.add_argument("--train-images", type=int, default=d.train_images, help="shapes: training images")
    p.add_argument("--val-images", type=int, default=d.val_images, help="shapes: held-out images")
    p.add_argument("--crop-size", type=int, default=None,
                   help="train on random crops of this side (needed for batches of VOC); 0: whole images "
                        "(default: the dataset's, minifcn.train.TRAINING_CROPS: 96 for shapes, whole images "
                        "otherwise; held-out images are scored whole)")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--input-scale", type=float, default=d.input_scale, help="multiplier after mean subtraction")
    p.add_argument("--class-weight", choices=("none", "balanced", "sqrt-balanced"), default=d.class_weight,
                   help="loss weight per class from the training set's pixel counts (median-frequency balancing)")
    p.add_argument("--bgr", action="store_true", help="feed BGR (Caffe-converted weights)")
    p.add_argument("--vgg-weights", default=None,
                   help=".npz of torchvision VGG16 weights for the backbone (default: none, from scratch)")
    p.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="start from the parameters of this checkpoint whose name and shape match "
                        "(staged training: fcn16s from an fcn32s run's best.npz, fcn8s from fcn16s; "
                        "default: none)")
    p.add_argument("--device", default=None, help="cpu or gpu (default: $MINIFCN_DEVICE or cpu)")
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype, help="parameters and inputs")
    p.add_argument("--seed", type=int, default=d.seed, help="initial weights, data order, augmentation, shapes images")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from OUT/checkpoint.npz (same model, width, dataset, image size)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run files of a non-empty OUT (without it, or --resume, OUT must be empty)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="folder datasets: the number of classes (default: the largest mask value + 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cmd_train(args):
    from .backend import check_device  # noqa: PLC0415
    from .train import TrainConfig, TrainingDiverged, TrainingInterrupted, train  # noqa: PLC0415

    cfg = TrainConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, out=args.out, width=args.width,
                      epochs=args.epochs, batch_size=args.batch_size, ranks=args.ranks, lr=args.lr,
                      momentum=args.momentum, weight_decay=args.weight_decay, reduction=args.reduction,
                      schedule=args.schedule, poly_power=args.poly_power, warmup=args.warmup,
                      learn_upsampling=args.learn_upsampling, dropout=args.dropout, image_size=args.image_size,
                      train_images=args.train_images, val_images=args.val_images, crop_size=args.crop_size,
                      flip=not args.no_flip, input_scale=args.input_scale, class_weight=args.class_weight,
                      bgr=args.bgr,
                      vgg_weights=args.vgg_weights, init_from=args.init_from, device=check_device(args.device),
                      dtype=args.dtype,
                      seed=args.seed, resume=args.resume, overwrite=args.overwrite, num_classes=args.num_classes,
                      progress=not args.no_progress)
    start = time.perf_counter()
    try:
        history = train(cfg)
    except TrainingDiverged as exc:
        return fail(f"error: {exc}", 3)
    except TrainingInterrupted as exc:
        if world().rank == 0:  # Ctrl-C reaches every rank; one of them says it
            print(exc, file=sys.stderr)  # one line: where the last checkpoint is, how to resume
        return 130
    if history and world().rank == 0:
        best = max(history, key=lambda r: r["mean_iu"])
        print(f"done in {time.perf_counter() - start:.0f} s: best mean IU {best['mean_iu']:.4f} at epoch "
              f"{best['epoch']}; see {cfg.out}/ (metrics.jsonl, loss.png, predictions.png, best.npz)")
    return 0


def cmd_eval(args):
    from .data import DataLoader, IMAGENET_MEAN_RGB, validate_dataset  # noqa: PLC0415
    from .metrics import format_scores  # noqa: PLC0415
    from .train import (TrainConfig, dataset_for_checkpoint, eval_batch_size, evaluate, load_model,  # noqa: PLC0415
                        strict_json)

    comm = world()  # under mpiexec: each rank scores its shard, the confusion matrices are summed, rank 0 prints
    comm.bind_device(args.device or "cpu")
    model, meta = load_model(args.checkpoint, args.device or "cpu")
    cfg = TrainConfig.from_dict(meta["config"])
    name, dataset = dataset_for_checkpoint(meta, args.dataset, args.data_dir, args.split, args.checkpoint)
    validate_dataset(dataset, meta["num_classes"])
    loader = DataLoader(dataset, eval_batch_size(name), mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale,
                        num_shards=comm.size, shard=comm.rank)
    scores = evaluate(model, loader, meta["num_classes"], args.device or "cpu", comm)
    if comm.rank > 0:
        return 0
    if args.json:
        print(strict_json(scores))  # NaN (a class absent from the split) as null
    else:
        print(f"{args.checkpoint}: {name} {args.split} split, {len(dataset)} images")
        print(format_scores(scores, meta.get("class_names")))
    return 0


def output_names(paths, suffix):
    """One output file name per input, NAME + suffix; a name already taken in this call gets -2, -3, ...
    (two inputs a/img.png and b/img.png never write onto one file)."""
    taken, names = set(), []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, k = stem + suffix, 1
        while name in taken:
            k += 1
            name = f"{stem}-{k}{suffix}"
        taken.add(name)
        names.append(name)
    return names


def cmd_predict(args):
    import numpy as np  # noqa: PLC0415

    from .backend import to_device, to_numpy  # noqa: PLC0415
    from .data import IMAGENET_MEAN_RGB, DatasetError, read_image, to_tensor  # noqa: PLC0415
    from .train import TrainConfig, load_model, predict_labels  # noqa: PLC0415
    from .viz import TILE, overlay, prediction_grid, save_png  # noqa: PLC0415

    # under mpiexec: rank r predicts inputs r, r + N, r + 2N, ...; rank 0 prints every line, in input order
    comm = world()
    device = args.device or "cpu"
    comm.bind_device(device)
    model, meta = load_model(args.checkpoint, device)
    bad = []
    for path in args.images:  # every input checked before anything is written (on every rank: one answer)
        try:
            read_image(path)
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        for line in bad if comm.rank == 0 else ():
            print(f"error: {line}", file=sys.stderr)
        if comm.rank == 0:
            print(f"error: {len(bad)} of {len(args.images)} images cannot be read; nothing was written",
                  file=sys.stderr)
        return 2
    cfg = TrainConfig.from_dict(meta["config"])
    names = list(meta.get("class_names") or [str(c) for c in range(meta["num_classes"])])
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    targets = output_names(args.images, "_overlay.png" if args.overlay_only else "_prediction.png")
    lines = []  # (input index, line) of this rank's inputs, printed by rank 0 once all are done
    for i in range(comm.rank, len(args.images), comm.size):
        path, name = args.images[i], targets[i]
        image = read_image(path)
        x = to_tensor(image, mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale)[None]
        pred = to_numpy(predict_labels(model, to_device(np.ascontiguousarray(x), device)))[0]
        target = os.path.join(args.out, name)
        if args.overlay_only:
            save_png(overlay(image, pred), target)
        else:  # full size for photos, an integer upscale for small images
            prediction_grid([image], None, [pred], target, class_names=names,
                            scale=1 if max(image.shape[:2]) >= TILE else None)
        present = sorted(set(np.unique(pred).tolist()) - {0})
        classes = ", ".join(names[c] if c < len(names) else str(c) for c in present) or "none"
        line = f"{path} -> {target}  classes: {classes}"
        if comm.size == 1:
            print(line)  # as each image is done
        else:
            lines.append((i, line))
    if comm.size > 1:
        gathered = comm.gather_objects(lines)
        for _, line in sorted(line for rank_lines in gathered or () for line in rank_lines):
            print(line)
    return 0


def cmd_gradcheck(args):
    from .gradcheck import run_suite  # noqa: PLC0415

    rows, passed = run_suite(mode=args.mode, tol=args.tol)
    header = ("layer", "configuration", "tensor", "max rel err", "result")
    table = [header] + [(a, b, c, f"{e:.2e}", r) for a, b, c, e, r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print(f"gradient check of every layer: float64, central differences, {args.mode} mode, tol {args.tol:g}\n")
    for i, r in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    failed = sum(r[-1] == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed} passed, {failed} failed")
    return 0 if passed else 1


def _add_explain(sub):
    p = _parser(sub, "explain", "explanations computed from the code: conv-matrix, fcn, sizes, routes")
    what = p.add_subparsers(dest="topic", required=True)
    q = _parser(what, "conv-matrix", "the matrix C of a convolution; transposed conv and backward are C^T")
    q.add_argument("--size", type=int, default=4, help="input side (one channel)")
    q.add_argument("--kernel", type=int, default=3, help="kernel side (weights 1..k*k)")
    _add_geometry(q)
    q = _parser(what, "fcn", "an FCN layer by layer: shapes, strides, receptive fields, crop offsets")
    q.add_argument("--model", default="fcn8s", help="fcn32s, fcn16s, fcn8s or fcn8s-atonce")
    q.add_argument("--size", type=_image_size, default="500", metavar="SIDE|HxW",
                   help="input image size in pixels: one side (square), or HEIGHTxWIDTH such as 375x500")
    q.add_argument("--width", type=float, default=0.125,
                   help="channel multiplier of the model, as in 'train --width' (not the image: see --size; "
                        "1.0 = the paper's, slow to build)")
    q.add_argument("--classes", type=int, default=21, help="number of classes (score channels)")
    q.add_argument("--all", action="store_true", help="also list ReLU and Dropout blobs")
    q = _parser(what, "routes", "the route (textbook or fast) each layer and pass of an FCN runs, and why")
    q.add_argument("--model", default="fcn8s", help="fcn32s, fcn16s, fcn8s or fcn8s-atonce")
    q.add_argument("--size", type=int, default=128, help="input image side in pixels")
    q.add_argument("--width", type=float, default=0.125,
                   help="channel multiplier of the model, as in 'train --width' (1.0 = the paper's)")
    q.add_argument("--batch", type=int, default=1, help="images per batch")
    q.add_argument("--classes", type=int, default=21, help="number of classes (score channels)")
    q.add_argument("--time", action="store_true", help="also time each pass by its textbook and its fast route")
    q = _parser(what, "sizes", "convolution and transposed-convolution output sizes; output_padding")
    q.add_argument("--size", type=int, default=7, help="input side")
    q.add_argument("--kernel", type=int, default=3, help="kernel side")
    _add_geometry(q)


def _image_size(text):
    """'500' -> (500, 500); '375x500' -> (375, 500)."""
    parts = text.lower().split("x")
    if len(parts) > 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected SIDE or HEIGHTxWIDTH in pixels (e.g. 500 or 375x500), got {text!r}")
    return int(parts[0]), int(parts[-1])


def _add_geometry(q):
    q.add_argument("--stride", type=int, default=2, help="convolution stride")
    q.add_argument("--padding", type=int, default=1, help="zero padding on each side")
    q.add_argument("--dilation", type=int, default=1, help="spacing of the kernel taps")


def cmd_explain(args):
    from . import explain  # noqa: PLC0415

    if args.topic == "conv-matrix":
        print(explain.conv_matrix_report(args.size, args.kernel, args.stride, args.padding, args.dilation))
    elif args.topic == "fcn":
        height, width = args.size
        rows = explain.fcn_table(args.model, height, width, model_width=args.width, num_classes=args.classes)
        print(f"{args.model} on a {height} x {width} input (channels at width "
              f"{args.width:g}; stride and RF in input pixels; unit u of a blob is centred on input row "
              f"'input row of unit u'; crop offsets: the model's, and in brackets the one the maps demand)\n")
        print(explain.format_fcn_table(rows, skip_activations=not args.all))
    elif args.topic == "routes":
        from . import explain_routes, routes  # noqa: PLC0415

        rows = explain_routes.route_table(args.model, args.size, model_width=args.width, batch=args.batch,
                                          num_classes=args.classes, time=args.time)
        print(f"{args.model} at width {args.width:g}, one training step on {args.batch} x 3 x {args.size} x "
              f"{args.size}; route mode {routes.mode()!r} (MINIFCN_ROUTE=textbook|fast)"
              + ("; times: medians of 3 runs on random inputs, this machine" if args.time else "") + "\n")
        print(explain_routes.format_route_table(rows))
    else:
        print(explain.size_report(args.size, args.kernel, args.stride, args.padding, args.dilation))
    return 0


def build_parser():
    """The ``minifcn`` argument parser, every subcommand with every default in its --help."""
    parser = argparse.ArgumentParser(prog="minifcn", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,predict,gradcheck,explain}")
    _add_train(sub)
    p = _parser(sub, "eval", "evaluate a checkpoint: the four FCN metrics and per-class IU")
    p.add_argument("--checkpoint", required=True, help="a run's best.npz or checkpoint.npz")
    p.add_argument("--dataset", default=None,
                   help="shapes, voc or folder (default: the checkpoint's training dataset)")
    p.add_argument("--data-dir", default=None,
                   help="root of a VOC or folder dataset (default: the checkpoint's, if any)")
    p.add_argument("--split", default="val", help="which split to score: val or train")
    p.add_argument("--device", default=None, help="cpu or gpu (default: $MINIFCN_DEVICE or cpu)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p = _parser(sub, "predict", "write image | prediction | overlay with the class legend, one PNG per image")
    p.add_argument("--checkpoint", required=True, help="a run's best.npz or checkpoint.npz")
    p.add_argument("images", nargs="+", help="image files (any size; every one is checked before any is written)")
    p.add_argument("--out", default="predictions", help="folder for NAME_prediction.png (NAME_overlay.png)")
    p.add_argument("--overlay-only", action="store_true",
                   help="write only the prediction blended into the image, at the image's size")
    p.add_argument("--device", default=None, help="cpu or gpu (default: $MINIFCN_DEVICE or cpu)")
    p = _parser(sub, "gradcheck", "check every layer's backward against central differences")
    p.add_argument("--mode", choices=("elementwise", "random"), default="elementwise",
                   help="perturb every input element, or compare along random directions (faster)")
    p.add_argument("--tol", type=float, default=1e-6, help="largest relative error that passes")
    _add_explain(sub)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage; under MPI stop the other ranks too
        if exc.code and launched_size() is not None:
            return fail("error: invalid command line (see the usage above)", exc.code)
        raise
    handlers = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "gradcheck": cmd_gradcheck,
                "explain": cmd_explain}
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print(f"interrupted: minifcn {args.command} stopped", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        # Bad input (a corrupt checkpoint, a missing dataset, a label out of range...): one clear line.
        # Under MPI the failing rank's message, then every rank stops (no rank is left waiting).
        return fail(f"error: {exc}", 2)
