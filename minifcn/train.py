"""Training and evaluation loops.

``train(TrainConfig(...))`` builds the datasets, validates them before the
first step, trains with SGD, and after each epoch evaluates on the held-out
split and writes into ``config.out``:

* ``metrics.jsonl``: one JSON line per epoch (epoch, train_loss, pixel_acc,
  mean_acc, mean_iu, fwiu, per_class_iu, lr, seconds, step_loss); the scores
  are of the held-out split, train_loss the mean and step_loss the list of the
  epoch's per-step training losses;
* ``checkpoint.npz`` (latest) and ``best.npz`` (best mean IU), written atomically;
* ``loss.png`` (the per-step training loss, smoothed, beside the held-out
  scores per epoch) and ``predictions.png`` (images, ground truth, predictions).

A non-finite loss stops training with :class:`TrainingDiverged`; the last
good checkpoint on disk is left as it was.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .backend import check_device, to_device, to_numpy
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_prefix
from .data import DataLoader, IMAGENET_MEAN_RGB, get_dataset, validate_dataset
from .layers import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from .metrics import ConfusionMatrix
from .models import build_model, load_vgg16_npz, transfer_state
from .optim import SGD, make_schedule
from .viz import plot_training, prediction_grid


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint.

    The defaults train a small FCN-8s (width 0.125, 2.1 M parameters) from
    scratch on the built-in ``shapes`` dataset in under ten minutes on a
    2-core CPU: 128 x 128 images, batch 1, per-pixel mean loss with lr 0.01,
    learned 2x upsampling (the CVPR recipe), no dropout (a small model trained
    from scratch for minutes learns faster without it; the model's own default
    stays the reference's 0.5).
    """

    model: str = "fcn8s"
    dataset: str = "shapes"
    data_dir: str | None = None
    out: str = "runs/shapes-fcn8s"
    width: float = 0.125
    epochs: int = 6
    batch_size: int = 1            # twice the updates of batch 2 for the same work: mean IU 0.909 against 0.897 after 7 epochs (benchmarks/RESULTS.md)
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reduction: str = "mean"        # 'mean' per pixel, or 'sum' as in the reference (then lr ~ 1e-10 for VOC)
    schedule: str = "poly"         # constant, step or poly (per iteration)
    learn_upsampling: bool = True
    dropout: float = 0.0
    image_size: int = 128          # shapes only
    train_images: int = 800        # shapes only
    val_images: int = 128          # shapes only
    crop_size: int | None = None
    flip: bool = True
    input_scale: float = 0.017     # after mean subtraction; about 1/std of natural images (use 1.0 for Caffe VGG weights)
    class_weight: str = "none"     # loss weight per class: none, balanced or sqrt-balanced (see class_weights)
    bgr: bool = False
    vgg_weights: str | None = None
    init_from: str | None = None   # a checkpoint whose parameters of the same name and shape start this model (staged training)
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    progress: bool = True
    num_preview: int = 6
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


def make_datasets(cfg: TrainConfig):
    """(train, val) datasets for a config."""
    if cfg.dataset == "shapes":
        kw = dict(image_size=cfg.image_size, seed=cfg.seed)
        return (get_dataset("shapes", split="train", num_images=cfg.train_images, **kw),
                get_dataset("shapes", split="val", num_images=cfg.val_images, **kw))
    return (get_dataset(cfg.dataset, cfg.data_dir, split="train"), get_dataset(cfg.dataset, cfg.data_dir, split="val"))


CLASS_WEIGHTS = ("none", "balanced", "sqrt-balanced")


def class_weights(pixel_counts, mode: str):
    """Per-class loss weights from the training set's pixel counts, or None for ``mode='none'``.

    ``balanced`` is median-frequency balancing (Eigen and Fergus, ICCV 2015):
    ``w_c = median(f) / f_c`` with ``f_c`` the share of class c among labelled
    pixels, so a rare class counts as much as a median one. ``sqrt-balanced``
    takes its square root, a milder push away from the dominant background.
    A class with no pixels gets weight 0 (it cannot be learned from this data).
    """
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"class_weight must be one of {', '.join(CLASS_WEIGHTS)}, got {mode!r}")
    if mode == "none":
        return None
    counts = np.asarray(pixel_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise ValueError("class_weight: the training set has no labelled pixels")
    freq = counts / counts.sum()
    weights = np.zeros_like(freq)
    weights[present] = np.median(freq[present]) / freq[present]
    return np.sqrt(weights) if mode == "sqrt-balanced" else weights


def make_loss(model, reduction: str, class_weight=None):
    if getattr(model, "num_classes", None) == 1:
        return SigmoidBinaryCrossEntropy(reduction=reduction)
    return SoftmaxCrossEntropy(ignore_index=255, reduction=reduction, class_weight=class_weight)


def predict_labels(model, images):
    """Class index per pixel: argmax over channels (or logit > 0 for one channel)."""
    logits = model(images)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1)


def evaluate(model, loader, num_classes: int, device: str = "cpu"):
    """Accumulate one confusion matrix over the whole loader; returns ``scores()`` of it."""
    model.eval()
    confusion = ConfusionMatrix(max(num_classes, 2))
    for images, labels in loader:
        confusion.update(predict_labels(model, to_device(images, device)), to_device(labels, device))
    model.train()
    return confusion.scores()


def _dropout_states(model):
    return {name: m.rng.bit_generator.state for name, m in model.named_modules()
            if isinstance(getattr(m, "rng", None), np.random.Generator)}


def _set_dropout_states(model, states):
    modules = dict(model.named_modules())
    for name, state in states.items():
        modules[name].rng.bit_generator.state = state


def build_from_config(cfg: TrainConfig, num_classes: int):
    return build_model(cfg.model, num_classes=num_classes, width=cfg.width, seed=cfg.seed,
                       **({} if cfg.model == "encoder-decoder" else
                          dict(learn_upsampling=cfg.learn_upsampling, dropout=cfg.dropout)))


def _save(path, model, optimizer, cfg, epoch, history, class_names):
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    meta = {"format": "minifcn-checkpoint-1", "epoch": epoch, "config": asdict(cfg), "history": history,
            "class_names": list(class_names), "num_classes": len(class_names),
            "dropout_states": _dropout_states(model)}
    save_checkpoint(path, arrays, meta)


def load_model(path, device: str = "cpu"):
    """Rebuild the model saved in a checkpoint; returns ``(model, meta)``."""
    arrays, meta = load_checkpoint(path)
    if meta.get("format") != "minifcn-checkpoint-1":
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: unknown format {meta.get('format')!r}")
    cfg = TrainConfig.from_dict(meta["config"])
    model = build_from_config(cfg, meta["num_classes"])
    try:
        model.load_state_dict(split_prefix(arrays, "model"))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} does not fit a {cfg.model} "
                              f"(width {cfg.width}): {exc}") from None
    return model.to(check_device(device)), meta


def init_from_checkpoint(model, path):
    """Copy into ``model`` every parameter of the checkpoint at ``path`` whose name and shape match.

    This is the reference's staged training (FCN-32s -> FCN-16s -> FCN-8s):
    a finer model starts from the coarser one's backbone and score_fr, and its
    new layers (score_pool4, upscore2, ...) keep their initialisation (zero
    score layers, bilinear upsampling), so it begins by predicting what the
    coarser model predicted. Returns ``(copied, new, mismatched)`` name lists:
    copied from the checkpoint, kept as initialised (absent from it), and kept
    as initialised because the checkpoint's shape differs (e.g. another number
    of classes). Raises CheckpointError if nothing can be copied. The file is
    read by :func:`minifcn.checkpoint.load_checkpoint` (never unpickled).
    """
    arrays, _ = load_checkpoint(path)
    saved = split_prefix(arrays, "model")
    copied, new, mismatched = transfer_state(saved, model)  # copies nothing when nothing matches
    if not copied:
        own = dict(model.named_parameters())
        shapes = "; ".join(f"{k}: {tuple(saved[k].shape)} here {tuple(own[k].shape)}" for k in mismatched[:3])
        raise CheckpointError(f"--init-from {os.fspath(path)!r} shares no parameter of the same name and shape "
                              f"with this {type(model).__name__} ({len(saved)} arrays in the checkpoint"
                              + (f", shapes differ: {shapes}" if shapes else ", no name in common") + ")")
    return copied, new, mismatched


def _layers(names, model):
    """Parameter names -> 'conv1_1, score_fr.bias': a layer's name where all its parameters are listed."""
    names, out = set(names), {}
    for name, _ in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        out.setdefault(layer, []).append(name)
    parts = []
    for layer, params in out.items():
        listed = [p for p in params if p in names]
        parts += [layer] if len(listed) == len(params) else listed
    return ", ".join(parts)


def _divergence_message(loss, epoch, iteration, cfg, checkpoint):
    kept = (f"the last good checkpoint {checkpoint!r} was kept" if os.path.exists(checkpoint)
            else "no checkpoint had been written yet")
    hint = ("with reduction='sum' the gradient grows with the number of pixels per batch, so the learning rate "
            "must be about (pixels per batch) times smaller than for 'mean' (the FCN reference uses 1e-10 on "
            "500x500 VOC images)" if cfg.reduction == "sum" else
            "with reduction='mean' a learning rate around 1e-3 to 5e-2 is usual; lower --lr")
    return (f"training diverged: loss is {loss} at epoch {epoch}, iteration {iteration} (lr={cfg.lr}, "
            f"reduction={cfg.reduction!r}). Likely cause: the learning rate is too large for the loss "
            f"normalisation: {hint}. {kept}.")


def strict_json(value) -> str:
    """``json.dumps`` with NaN and infinities written as null: strict JSON that any parser reads
    (Python's default writes the non-standard token NaN, e.g. for the IU of an absent class)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(value), allow_nan=False)


def train(cfg: TrainConfig, log=print):
    """Train according to ``cfg``; returns the history (list of per-epoch dicts)."""
    device = check_device(cfg.device)
    train_set, val_set = make_datasets(cfg)
    num_classes = train_set.num_classes
    pixel_counts = validate_dataset(train_set, num_classes)  # every file checked before the first step
    validate_dataset(val_set, num_classes)
    weights = class_weights(pixel_counts, cfg.class_weight)
    if weights is not None:
        log("class weights (" + cfg.class_weight + "): " + ", ".join(f"{w:.3f}" for w in weights))
    class_names = list(getattr(train_set, "class_names", [str(i) for i in range(num_classes)]))
    model = build_from_config(cfg, num_classes)
    if cfg.vgg_weights:
        load_vgg16_npz(model, cfg.vgg_weights)
    resuming = cfg.resume and os.path.exists(os.path.join(cfg.out, "checkpoint.npz"))
    if cfg.init_from and not resuming:
        copied, new, mismatched = init_from_checkpoint(model, cfg.init_from)
        log(f"init from {cfg.init_from}: copied {len(copied)} parameters ({_layers(copied, model)}); "
            f"new {len(new)} ({_layers(new, model) or 'none'})"
            + (f"; {len(mismatched)} not copied, shape differs: {_layers(mismatched, model)}" if mismatched else ""))
    model.to(device)
    model.input_grad = False  # the images need no gradient: conv1_1 skips its largest product
    optimizer = SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(model, cfg.reduction, weights)
    loader_kw = dict(mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, crop_size=cfg.crop_size,
                              flip=cfg.flip, drop_last=len(train_set) >= cfg.batch_size, **loader_kw)
    val_loader = DataLoader(val_set, cfg.batch_size if cfg.crop_size is None and cfg.dataset == "shapes" else 1,
                            **loader_kw)
    schedule = make_schedule(cfg.schedule, cfg.lr, max(1, cfg.epochs * len(train_loader)))

    os.makedirs(cfg.out, exist_ok=True)
    ckpt, best_path = os.path.join(cfg.out, "checkpoint.npz"), os.path.join(cfg.out, "best.npz")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    history, start_epoch = [], 0
    if resuming:
        arrays, meta = load_checkpoint(ckpt)
        model.load_state_dict(split_prefix(arrays, "model"))
        optimizer.load_state_dict(split_prefix(arrays, "optim"))
        _set_dropout_states(model, meta.get("dropout_states", {}))
        history, start_epoch = meta["history"], meta["epoch"] + 1
        with open(metrics_path, "w") as f:  # drop lines of epochs after the checkpoint (an interrupted run)
            f.writelines(strict_json(row) + "\n" for row in history)
        log(f"resuming from {ckpt} at epoch {start_epoch + 1}"
            + (" (--init-from applies to a fresh start only)" if cfg.init_from else ""))
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)
    best = max((row["mean_iu"] for row in history if not math.isnan(row["mean_iu"])), default=-1.0)

    log(f"training {cfg.model} (width {cfg.width}, {model.num_parameters(True):,} learnable parameters) on "
        f"{cfg.dataset}: {len(train_set)} train / {len(val_set)} val images, {cfg.epochs} epochs, device {device}")
    iteration = start_epoch * len(train_loader)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        losses = []
        batches = train_loader.epoch(epoch)
        if cfg.progress:
            from tqdm import tqdm  # noqa: PLC0415
            batches = tqdm(batches, total=len(train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           leave=False, dynamic_ncols=True)
        for images, labels in batches:
            optimizer.lr = schedule(iteration)
            model.zero_grad()
            logits = model(to_device(images, device))
            loss = loss_fn(logits, to_device(labels, device))
            if not math.isfinite(loss):
                raise TrainingDiverged(_divergence_message(loss, epoch + 1, iteration, cfg, ckpt))
            model.backward(loss_fn.backward())
            optimizer.step()
            losses.append(loss)
            iteration += 1
            if cfg.progress:
                batches.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{optimizer.lr:.3g}")
        scores = evaluate(model, val_loader, num_classes, device)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "pixel_acc": scores["pixel_acc"], "mean_acc": scores["mean_acc"], "mean_iu": scores["mean_iu"],
               "fwiu": scores["fwiu"], "per_class_iu": scores["per_class_iu"], "lr": optimizer.lr,
               "seconds": time.perf_counter() - t0, "step_loss": [float(f"{v:.5g}") for v in losses]}
        history.append(row)
        with open(metrics_path, "a") as f:
            f.write(strict_json(row) + "\n")
        _save(ckpt, model, optimizer, cfg, epoch, history, class_names)
        if scores["mean_iu"] > best:
            best = scores["mean_iu"]
            _save(best_path, model, optimizer, cfg, epoch, history, class_names)
        plot_training(history, os.path.join(cfg.out, "loss.png"))
        write_predictions(model, val_set, loader_kw, os.path.join(cfg.out, "predictions.png"), class_names,
                          cfg.num_preview, device)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  pixel acc {row['pixel_acc']:.4f}  "
            f"mean IU {row['mean_iu']:.4f}  fw IU {row['fwiu']:.4f}  ({row['seconds']:.1f} s)")
    return history


def write_predictions(model, dataset, loader_kw, path, class_names, count, device="cpu"):
    """Save images | ground truth | prediction for the first ``count`` samples of ``dataset``."""
    count = min(count, len(dataset))
    if count == 0:
        return
    images, labels, preds = [], [], []
    loader = DataLoader(dataset, 1, **loader_kw)
    model.eval()
    for i, (x, _) in zip(range(count), loader):
        image, label = dataset[i]
        images.append(image)
        labels.append(np.asarray(label))
        preds.append(to_numpy(predict_labels(model, to_device(x, device)))[0])
    model.train()
    prediction_grid(images, labels, preds, path, class_names=class_names)
