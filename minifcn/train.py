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

Nothing is lost and nothing is silently wrong:

* a run folder that holds anything is refused unless ``resume`` (continue
  from its checkpoint, which must exist and was trained with the same model,
  width, dataset and image size) or ``overwrite`` (replace its run files);
* each epoch's checkpoint, best checkpoint and ``metrics.jsonl`` are written
  together (:func:`minifcn.atomic.atomic_write_all`), only after the weights
  and the validation logits were found finite, so the files always agree and
  the last checkpoint is always a good one; temporaries left by a killed save
  are deleted at the next start;
* a non-finite loss, weight or logit stops training with
  :class:`TrainingDiverged`, Ctrl-C with :class:`TrainingInterrupted`; both
  say where the last good checkpoint is.

Under ``mpiexec -n N`` the same loop trains one model on N processes
(:mod:`minifcn.distributed`, docs/data_parallel.md): each takes its
``batch_size`` images of every global batch of ``N * batch_size``, the loss is
normalised over the global batch, gradients are averaged, evaluation is
sharded and its confusion matrices summed, and rank 0 alone writes the run
folder. With one process the communicator is a stand-in whose operations do
nothing.

Without a launcher, ``ranks`` (default :data:`LOCAL_RANKS`, 2) runs the same
data-parallel loop on that many processes of this machine, which ``train``
starts itself (:mod:`minifcn.local_ranks`): one process at batch 1 keeps only
about one core busy. ``ranks=1`` trains in this process.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from .atomic import atomic_write_all, remove_temporaries
from .backend import check_device, get_array_module, to_device, to_numpy
from .checkpoint import (SUFFIX, CheckpointError, checkpoint_writer, first_nonfinite, load_checkpoint, read_meta,
                         split_prefix)
from .data import DataLoader, IMAGENET_MEAN_RGB, check_learnable, get_dataset, validate_dataset
from . import local_ranks
from .distributed import StepLoss, world
from .layers import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from .metrics import ConfusionMatrix
from .models import build_model, load_vgg16_npz, transfer_state
from .optim import SGD, make_schedule
from .viz import plot_training, prediction_grid


class TrainingDiverged(RuntimeError):
    """The loss, a weight or a validation logit became NaN or infinite."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is and how to resume."""


class NonFiniteLogits(RuntimeError):
    """A model produced NaN or infinite logits during evaluation."""


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint.

    The defaults train a small FCN-8s (width 0.125, 2.1 M parameters) from
    scratch on the built-in ``shapes`` dataset in minutes on a 2-core CPU:
    128 x 128 images, trained on random 96 x 96 crops of them (``training_crop``)
    and scored whole, on 2 local ranks of batch 1 each (a global batch of 2,
    :data:`LOCAL_RANKS`), 5 epochs, per-pixel mean loss with lr 0.02 after 100
    steps of linear warm-up, and poly decay (times and scores per processor,
    and the recipe search, are in benchmarks/RESULTS.md), learned 2x upsampling (the CVPR recipe), no
    dropout (a small model trained from scratch for minutes learns faster without it; the model's own default
    stays the reference's 0.5).
    """

    model: str = "fcn8s"
    dataset: str = "shapes"
    data_dir: str | None = None
    out: str = "runs/shapes-fcn8s"
    width: float = 0.125
    epochs: int = 5
    batch_size: int = 1            # per rank; the global batch is ranks x batch_size (x the mpiexec ranks)
    ranks: int | None = None       # processes of this machine (minifcn.local_ranks); None: LOCAL_RANKS, 1 under mpiexec
    lr: float = 0.02               # for the global batch of 2, with the warm-up: 0.906 and 0.911 (seeds 0, 1) after
    #                                5 epochs; without it 0.02 collapses (0.840) and 0.015 needs 6 epochs for 0.904;
    #                                batch 1 alone: 0.005 (benchmarks/RESULTS.md, eighth session on issue 13)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    reduction: str = "mean"        # 'mean' per pixel, or 'sum' as in the reference (then lr ~ 1e-10 for VOC)
    schedule: str = "poly"         # constant, step or poly (per iteration)
    poly_power: float = 0.9        # poly: lr * (1 - t / T) ** power
    warmup: int = 100              # iterations of linear warm-up before the schedule (0: none)
    learn_upsampling: bool = True
    dropout: float = 0.0
    image_size: int = 128          # shapes only
    train_images: int = 800        # shapes only
    val_images: int = 128          # shapes only
    crop_size: int | None = None   # training crops' side; None: the dataset's (TRAINING_CROPS), 0: whole images
    flip: bool = True
    input_scale: float = 0.017     # after mean subtraction; about 1/std of natural images (use 1.0 for Caffe VGG weights)
    class_weight: str = "none"     # loss weight per class: none, balanced or sqrt-balanced (see class_weights)
    bgr: bool = False
    vgg_weights: str | None = None
    init_from: str | None = None   # a checkpoint whose parameters of the same name and shape start this model (staged training)
    device: str = "cpu"
    dtype: str = "float32"         # or float64 (as exact as the gradient checks; the distributed equivalence test)
    seed: int = 0
    resume: bool = False
    overwrite: bool = False        # replace the run files of a non-empty out folder
    num_classes: int | None = None  # folder datasets: None infers it from the masks (see FolderDataset)
    progress: bool = True
    num_preview: int = 6
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# Data-parallel processes `train` starts on this machine when ranks is None (not under mpiexec): two ranks of
# batch 1 use both cores of a small machine, where one process at batch 1 keeps about one busy; the global
# batch of 2 (at lr 0.015 then) reached a higher mean IU than batch 1 at lr 0.005, in less time (RESULTS.md).
LOCAL_RANKS = 2


def resolve_ranks(cfg: TrainConfig, comm) -> int:
    """The number of local processes a run trains on: ``cfg.ranks``, or :data:`LOCAL_RANKS` (1 when an MPI
    launcher started this process as one of several ranks, which are the run's ranks then)."""
    if cfg.ranks is None:
        return LOCAL_RANKS if comm.size == 1 else 1
    if cfg.ranks > 1 and comm.size > 1:
        raise ValueError(f"ranks (--ranks) {cfg.ranks}: this process is one of {comm.size} ranks an MPI launcher "
                         f"started; give the number of processes to mpiexec -n, and --ranks 1")
    return cfg.ranks


# Side of the random crops a dataset's training images are cut to when crop_size is None and the images are
# larger (held-out images are always scored whole). shapes: crops of 96 of its 128 x 128 images learn as
# much per step as whole images and cost less per step (padding 100 keeps conv1 on a (side + 198)^2 map, so
# the saving is smaller than the pixel count suggests); crops of 64 learn far less. benchmarks/RESULTS.md.
TRAINING_CROPS = {"shapes": 96}


def training_crop(cfg: TrainConfig) -> int | None:
    """The side of the random training crops, or None for whole images: ``cfg.crop_size`` if given (0: whole
    images), else the dataset's entry in :data:`TRAINING_CROPS` where its images are larger than that
    (shapes images of 96 x 96 or less train whole). The one place the crop is decided."""
    if cfg.crop_size is not None:
        return cfg.crop_size or None
    side = TRAINING_CROPS.get(cfg.dataset)
    return side if side is not None and cfg.image_size > side else None


def check_config(cfg: TrainConfig) -> None:
    """Refuse values that cannot train, naming the setting (and its command-line option) and the value."""
    def bad(name, rule):
        value = getattr(cfg, name)
        raise ValueError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {value!r}")

    def integer(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    for name in ("epochs", "batch_size", "train_images", "val_images", "image_size"):
        if not integer(getattr(cfg, name)) or getattr(cfg, name) < 1:
            bad(name, "a positive integer")
    if cfg.ranks is not None and (not integer(cfg.ranks) or cfg.ranks < 1):
        bad("ranks", "a positive integer (1: train in this process)")
    if not integer(cfg.seed) or cfg.seed < 0:
        bad("seed", "a non-negative integer")
    if cfg.num_classes is not None and (not integer(cfg.num_classes) or cfg.num_classes < 2):
        bad("num_classes", "an integer >= 2 (a model with one class learns nothing)")
    if cfg.crop_size is not None and (not integer(cfg.crop_size) or cfg.crop_size < 0):
        bad("crop_size", "a positive integer (or 0: whole images)")
    for name in ("lr", "width", "input_scale"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            bad(name, "a finite number > 0")
    for name in ("momentum", "weight_decay"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            bad(name, "a finite number >= 0")
    if not 0 <= cfg.dropout < 1:
        bad("dropout", "in [0, 1)")
    if cfg.resume and cfg.overwrite:
        raise ValueError("resume (--resume) and overwrite (--overwrite) exclude each other: continue the run in "
                         f"{cfg.out}, or replace it")


def make_datasets(cfg: TrainConfig):
    """(train, val) datasets for a config."""
    if cfg.dataset == "shapes":
        kw = dict(image_size=cfg.image_size, seed=cfg.seed)
        sets = (get_dataset("shapes", split="train", num_images=cfg.train_images, **kw),
                get_dataset("shapes", split="val", num_images=cfg.val_images, **kw))
    else:
        kw = {} if cfg.dataset != "folder" else dict(num_classes=cfg.num_classes)
        sets = (get_dataset(cfg.dataset, cfg.data_dir, split="train", **kw),
                get_dataset(cfg.dataset, cfg.data_dir, split="val", **kw))
    if cfg.num_classes is not None and sets[0].num_classes != cfg.num_classes:
        raise ValueError(f"num_classes (--num-classes) is {cfg.num_classes} but dataset {cfg.dataset!r} has "
                         f"{sets[0].num_classes} classes (only folder datasets take --num-classes)")
    return sets


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


def with_next(iterable):
    """``(item, next item or None)`` pairs of ``iterable``: each item is made one step early."""
    items = iter(iterable)
    current = next(items, None)
    while current is not None:
        upcoming = next(items, None)
        yield current, upcoming
        current = upcoming


def pixel_count(loss_fn, labels, model, dtype, device) -> float:
    """``loss_fn.count`` of a batch with these labels, from the labels alone (before its forward pass)."""
    return loss_fn.count_of(to_device(labels, device), (len(labels), model.num_classes, *labels.shape[1:]), dtype)


def model_dtype(model):
    """The dtype of the model's parameters (its input must have it too)."""
    return model.parameters()[0].dtype


def predict_labels(model, images):
    """Class index per pixel: argmax over channels (or logit > 0 for one channel)."""
    return labels_of(model(images.astype(model_dtype(model), copy=False)))


def labels_of(logits):
    """Class index per pixel of logits (N, C, H, W): argmax over channels (or logit > 0 for one channel)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).astype(np.int64)
    return logits.argmax(axis=1)


def eval_batch_size(dataset: str) -> int:
    """Images per forward pass when scoring: 4 for ``shapes`` (its images share one size; 4 scored a
    shard faster than 1 or 8, both with one thread, as each of two local ranks has, and with two:
    benchmarks/RESULTS.md), 1 for datasets whose images may differ in size (VOC, folders).
    Predictions do not depend on it."""
    return 4 if dataset == "shapes" else 1


def evaluate(model, loader, num_classes: int, device: str = "cpu", comm=None, keep=None):
    """Accumulate one confusion matrix over the whole loader; returns ``scores()`` of it.

    Raises NonFiniteLogits if the model's logits hold NaN or infinity (their argmax
    would be scored as class 0, a plausible-looking pixel accuracy). With a
    communicator of N ranks, each rank's loader holds its shard of the data and
    the matrices are summed over the ranks before scoring. ``keep``: dataset
    indices whose predicted labels to keep; returned as ``scores["kept"]``,
    ``{index: labels (H, W) int64}`` for those this rank scored (the preview
    of :func:`gather_predictions`).
    """
    model.eval()
    confusion = ConfusionMatrix(max(num_classes, 2))
    dtype = model_dtype(model)
    keep, kept = set(keep or ()), {}
    indices_of = loader.batch_indices(0) if keep else itertools.repeat(())  # any iterable loader without keep
    for batch, (indices, (images, labels)) in enumerate(zip(indices_of, loader)):
        logits = model(to_device(images, device).astype(dtype, copy=False))
        if not bool(get_array_module(logits).isfinite(logits).all()):
            model.train()
            raise NonFiniteLogits(f"the model's logits hold NaN or infinity on evaluation batch {batch}")
        predicted = labels_of(logits)
        confusion.update(predicted, to_device(labels, device))
        for j, index in enumerate(indices):
            if int(index) in keep:
                kept[int(index)] = to_numpy(predicted[j]).astype(np.int64)
    (comm or world()).allreduce_sum_(confusion.matrix)
    model.train()
    scores = confusion.scores()
    if keep:
        scores["kept"] = kept
    return scores


def gather_predictions(comm, kept: dict, count: int) -> list:
    """Predicted labels of samples 0 .. count-1 on every rank, from ``kept`` (this rank's, by index:
    each sample was scored on one rank): two sums, of the shapes and of the labels, zeros elsewhere."""
    shapes = np.zeros((count, 2), np.int64)
    for index, labels in kept.items():
        shapes[index] = labels.shape
    comm.allreduce_sum_(shapes)
    ends = np.cumsum(shapes.prod(axis=1))
    flat = np.zeros(int(ends[-1]) if count else 0, np.int64)
    for index, labels in kept.items():
        flat[ends[index] - labels.size:ends[index]] = labels.ravel()
    comm.allreduce_sum_(flat)
    return [flat[end - h * w:end].reshape(h, w) for end, (h, w) in zip(ends, shapes)]


def _dropout_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(getattr(m, "rng", None), np.random.Generator)}


def _dropout_states(model):
    return {name: m.rng.bit_generator.state for name, m in _dropout_modules(model).items()}


def _set_dropout_states(model, states):
    modules = dict(model.named_modules())
    for name, state in states.items():
        modules[name].rng.bit_generator.state = state


def _rank_dropout_streams(model, seed: int, rank: int, epoch: int) -> None:
    """Rank r > 0 draws its own dropout masks, from ``[seed, rank, epoch]`` (rank 0 keeps the model's)."""
    for i, (_, m) in enumerate(sorted(_dropout_modules(model).items())):
        m.rng = np.random.default_rng([seed, rank, epoch, i])


DTYPES = ("float32", "float64")


def build_from_config(cfg: TrainConfig, num_classes: int):
    if cfg.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype!r}")
    return build_model(cfg.model, num_classes=num_classes, width=cfg.width, seed=cfg.seed, dtype=np.dtype(cfg.dtype),
                       **({} if cfg.model == "encoder-decoder" else
                          dict(learn_upsampling=cfg.learn_upsampling, dropout=cfg.dropout)))


def _checkpoint_writer(model, optimizer, cfg, epoch, history, class_names):
    arrays = {f"model.{k}": v for k, v in model.state_dict().items()}
    arrays.update({f"optim.{k}": v for k, v in optimizer.state_dict().items()})
    meta = {"format": "minifcn-checkpoint-1", "epoch": epoch, "config": asdict(cfg), "history": history,
            "class_names": list(class_names), "num_classes": len(class_names),
            "dropout_states": _dropout_states(model)}
    return checkpoint_writer(arrays, meta)


def load_trusted_checkpoint(path):
    """``load_checkpoint`` of a training checkpoint, refused unless it is minifcn's format and every
    weight is finite (a diverged run's weights give NaN logits, whose argmax is class 0 everywhere:
    a plausible-looking pixel accuracy). The one place eval, predict and resume load from."""
    arrays, meta = load_checkpoint(path)
    if meta.get("format") != "minifcn-checkpoint-1":
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: unknown format {meta.get('format')!r}")
    bad = first_nonfinite(split_prefix(arrays, "model"))
    if bad is not None:
        name, count = bad
        raise CheckpointError(f"checkpoint {os.fspath(path)!r}: parameter {name!r} holds {count} NaN or infinite "
                              f"value(s): the run that wrote it had diverged; use an earlier checkpoint")
    return arrays, meta


def load_model(path, device: str = "cpu"):
    """Rebuild the model saved in a checkpoint; returns ``(model, meta)``."""
    arrays, meta = load_trusted_checkpoint(path)
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


def dataset_for_checkpoint(meta, dataset=None, data_dir=None, split="val", checkpoint="the checkpoint"):
    """``(name, dataset)`` to evaluate a checkpoint on: by default the one it was trained on.

    Refuses a dataset with another number of classes than the checkpoint's
    (its scores and class names would be those of another problem). A folder
    dataset the checkpoint was trained on gets the checkpoint's class count,
    so a split whose masks lack the highest class still evaluates.
    """
    cfg = TrainConfig.from_dict(meta["config"])
    k = meta["num_classes"]
    name = dataset or (cfg.dataset if not data_dir else "folder")
    if name == "shapes":
        found = get_dataset("shapes", split=split, image_size=cfg.image_size, seed=cfg.seed,
                            num_images=cfg.val_images if split == "val" else cfg.train_images)
    else:
        data_dir = data_dir or cfg.data_dir
        trained_on = (name == cfg.dataset == "folder" and data_dir is not None and cfg.data_dir is not None
                      and os.path.abspath(data_dir) == os.path.abspath(cfg.data_dir))
        found = get_dataset(name, data_dir, split=split, **(dict(num_classes=k) if trained_on else {}))
    if found.num_classes != k:
        names = meta.get("class_names") or []
        raise ValueError(f"{checkpoint} predicts {k} classes ({', '.join(names)}) but dataset {name!r}"
                         f"{f' in {data_dir}' if name != 'shapes' else ''} has {found.num_classes}: its scores "
                         f"would belong to another problem. Evaluate on data with the checkpoint's classes")
    return name, found


def _divergence_message(what, epoch, iteration, cfg, checkpoint):
    kept = (f"the last good checkpoint {checkpoint!r} was kept" if os.path.exists(checkpoint)
            else "no checkpoint had been written yet")
    hint = ("with reduction='sum' the gradient grows with the number of pixels per batch, so the learning rate "
            "must be about (pixels per batch) times smaller than for 'mean' (the FCN reference uses 1e-10 on "
            "500x500 VOC images)" if cfg.reduction == "sum" else
            "with reduction='mean' a learning rate around 1e-3 to 5e-2 is usual; lower --lr")
    return (f"training diverged: {what} at epoch {epoch}, iteration {iteration} (lr={cfg.lr}, "
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


RUN_FILES = ("checkpoint.npz", "best.npz", "metrics.jsonl", "loss.png", "predictions.png")
RESUME_MUST_MATCH = ("model", "width", "dataset", "data_dir", "image_size", "train_images", "val_images", "seed",
                     "learn_upsampling", "num_classes")  # what the model's shapes and the data depend on


def prepare_run_folder(cfg: TrainConfig, log=print) -> None:
    """Apply the run-folder rule before anything is written into ``cfg.out``.

    Temporaries left by a save that was killed are deleted first. Then a
    folder holding anything is refused unless ``cfg.resume`` (its
    checkpoint.npz must exist) or ``cfg.overwrite`` (its run files are
    deleted once the data and the model are ready, just before the first
    step; other files are left alone). ``--resume`` on an empty or missing
    folder is an error too: there is nothing to continue.
    """
    out = cfg.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"out (--out) {out!r} is a file, not a folder: give a folder for the run")
    if not os.path.isdir(out):
        if cfg.resume:
            raise ValueError(f"--resume: the run folder {out!r} does not exist, so there is nothing to continue")
        return
    for name in RUN_FILES:
        for tmp in remove_temporaries(os.path.join(out, name), SUFFIX if name.endswith(".npz") else ".tmp"):
            log(f"removed {tmp}, left by an interrupted save")
    ckpt = os.path.join(out, "checkpoint.npz")
    if cfg.resume:
        if not os.path.isfile(ckpt):
            held = ", ".join(sorted(os.listdir(out))) or "nothing"
            raise ValueError(f"--resume: there is no checkpoint {ckpt!r} to continue from (the folder holds "
                             f"{held}); train without --resume into an empty folder, or add --overwrite")
        return
    entries = sorted(os.listdir(out))
    if not entries:
        return
    if not cfg.overwrite:
        listed = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        raise ValueError(f"the run folder {out!r} is not empty (it holds {listed}): add --resume to continue "
                         f"its run, --overwrite to replace its run files, or choose another --out")


def _remove_run_files(out, log) -> None:
    removed = [name for name in RUN_FILES if os.path.isfile(os.path.join(out, name))]
    for name in removed:
        os.remove(os.path.join(out, name))
    if removed:
        log(f"--overwrite: removed {', '.join(removed)} from {out}")


def check_resume_config(saved: dict, cfg: TrainConfig, path) -> None:
    """Refuse to resume a checkpoint with another model or other data; the error names every difference."""
    default = asdict(TrainConfig())
    differences = [f"{name.replace('_', '-')} {saved.get(name, default[name])!r} -> {getattr(cfg, name)!r}"
                   for name in RESUME_MUST_MATCH if saved.get(name, default[name]) != getattr(cfg, name)]
    if differences:
        raise ValueError(f"--resume: {os.fspath(path)} was trained with other settings than this run asks for "
                         f"(checkpoint -> now): {'; '.join(differences)}. Repeat the checkpoint's values, or "
                         f"train into another --out")


def _resume(path, cfg, model, optimizer, num_classes):
    """Load ``path`` into the model and optimiser; returns ``(history, start_epoch)``."""
    arrays, meta = load_trusted_checkpoint(path)
    check_resume_config(meta["config"], cfg, path)
    if meta["num_classes"] != num_classes:
        raise ValueError(f"--resume: {path} has {meta['num_classes']} classes but the dataset now has "
                         f"{num_classes}")
    model.load_state_dict(split_prefix(arrays, "model"))
    optimizer.load_state_dict(split_prefix(arrays, "optim"))
    _set_dropout_states(model, meta.get("dropout_states", {}))
    return meta["history"], meta["epoch"] + 1


def _metrics_writer(history):
    text = "".join(strict_json(row) + "\n" for row in history).encode("utf-8")
    return lambda f: f.write(text)


def _commit_epoch(paths, model, optimizer, cfg, epoch, history, class_names, improved):
    """Write the epoch's checkpoint (and best.npz when ``improved``) and the whole metrics.jsonl as one
    all-or-nothing step; an OSError (a full disk) changes none of them and names the file."""
    write = _checkpoint_writer(model, optimizer, cfg, epoch, history, class_names)
    items = [(paths["checkpoint"], write, SUFFIX)] + ([(paths["best"], write, SUFFIX)] if improved else [])
    items.append((paths["metrics"], _metrics_writer(history), ".tmp"))
    try:
        atomic_write_all(items)
    except OSError as exc:
        kept = (f"{paths['checkpoint']} and {paths['metrics']} still end at epoch {epoch}" if epoch > 0 else
                "no checkpoint has been written")
        message = f"{exc.strerror if exc.errno is not None else exc}; nothing of epoch {epoch + 1} was saved: {kept}"
        raise type(exc)(*((exc.errno, message) if exc.errno is not None else (message,))) from exc


def _nonfinite_weights(model):
    bad = first_nonfinite({name: to_numpy(p.data) for name, p in model.named_parameters()})
    return None if bad is None else f"parameter {bad[0]!r} holds {bad[1]} NaN or infinite value(s)"


def _last_checkpoint_line(ckpt, cfg):
    if not os.path.isfile(ckpt):
        return "no checkpoint was written yet; start again with the same command"
    try:
        at = f" (after epoch {read_meta(ckpt)['epoch'] + 1} of {cfg.epochs})"
    except (CheckpointError, KeyError, TypeError):  # only the epoch number is missing from the message
        at = ""
    return f"the last checkpoint is {ckpt}{at}; continue with the same command and --resume"


def launch_description(cfg: TrainConfig, train_set, val_set, pixel_counts, model) -> dict:
    """What every rank of a distributed run must agree on: the configuration (less the paths that may
    differ between machines), the data, and the model's parameters."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ("data_dir", "out", "vgg_weights", "progress")}
    return {"config": config, "train_images": len(train_set), "val_images": len(val_set),
            "train_pixels_per_class": [int(c) for c in pixel_counts],
            "parameters": {name: f"{tuple(p.shape)} {p.dtype}{'' if p.trainable else ' fixed'}"
                           for name, p in model.named_parameters()}}


def train(cfg: TrainConfig, log=print, comm=None):
    """Train according to ``cfg``; returns the history (list of per-epoch dicts).

    ``comm`` (default :func:`minifcn.distributed.world`) is the communicator:
    a stand-in for one process, or MPI under ``mpiexec``. With ``cfg.ranks``
    of 2 or more (the default without a launcher), the run trains on that
    many processes started here, and their exceptions are raised here.
    """
    comm = comm or world()
    log = log if comm.rank == 0 else (lambda *args, **kwargs: None)
    check_config(cfg)
    # the checkpoints record the crop (0: whole images) and the ranks this run trains on, not "the default"
    cfg = replace(cfg, crop_size=training_crop(cfg) or 0, ranks=resolve_ranks(cfg, comm))
    device = check_device(cfg.device)
    if comm.rank == 0:  # rank 0 alone reads and writes the run folder (an error there stops every rank)
        prepare_run_folder(cfg, log)
    ckpt = os.path.join(cfg.out, "checkpoint.npz")
    try:
        if cfg.ranks > 1:
            return local_ranks.run(cfg.ranks, _train_on_local_rank, cfg, device, log=log)
        return _train(cfg, device, log, comm)
    except KeyboardInterrupt:
        raise TrainingInterrupted(f"interrupted: {_last_checkpoint_line(ckpt, cfg)}") from None


def _train_on_local_rank(comm, cfg: TrainConfig, device):
    """One of the processes of :func:`train` with ``cfg.ranks > 1``: rank 0 logs through the parent."""
    return _train(cfg, device, comm.log, comm)


def _train(cfg: TrainConfig, device, log, comm):
    comm.bind_device(device)
    train_set, val_set = make_datasets(cfg)
    num_classes = train_set.num_classes
    pixel_counts = validate_dataset(train_set, num_classes)  # every file checked before the first step
    check_learnable(train_set, pixel_counts)
    validate_dataset(val_set, num_classes)
    weights = class_weights(pixel_counts, cfg.class_weight)
    if weights is not None:
        log("class weights (" + cfg.class_weight + "): " + ", ".join(f"{w:.3f}" for w in weights))
    class_names = list(getattr(train_set, "class_names", [str(i) for i in range(num_classes)]))
    model = build_from_config(cfg, num_classes)
    if cfg.vgg_weights:
        load_vgg16_npz(model, cfg.vgg_weights)
    if cfg.init_from and not cfg.resume:  # a resumed run continues from its own checkpoint
        copied, new, mismatched = init_from_checkpoint(model, cfg.init_from)
        log(f"init from {cfg.init_from}: copied {len(copied)} parameters ({_layers(copied, model)}); "
            f"new {len(new)} ({_layers(new, model) or 'none'})"
            + (f"; {len(mismatched)} not copied, shape differs: {_layers(mismatched, model)}" if mismatched else ""))
    model.to(device)
    comm.check_same(launch_description(cfg, train_set, val_set, pixel_counts, model))
    model.input_grad = False  # the images need no gradient: conv1_1 skips its largest product
    optimizer = SGD(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = make_loss(model, cfg.reduction, weights)
    loader_kw = dict(mean=IMAGENET_MEAN_RGB, bgr=cfg.bgr, scale=cfg.input_scale)
    shards = dict(num_shards=comm.size, shard=comm.rank)  # rank r takes its cfg.batch_size images of each global batch
    if comm.size > 1 and len(train_set) < comm.size * cfg.batch_size:
        raise ValueError(f"the training set has {len(train_set)} images, fewer than one global batch of "
                         f"{comm.size} ranks x batch size {cfg.batch_size}")
    crop = training_crop(cfg)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, seed=cfg.seed, crop_size=crop,
                              flip=cfg.flip, drop_last=len(train_set) >= comm.size * cfg.batch_size,
                              **loader_kw, **shards)
    val_loader = DataLoader(val_set, eval_batch_size(cfg.dataset), **loader_kw, **shards)
    schedule = make_schedule(cfg.schedule, cfg.lr, max(1, cfg.epochs * len(train_loader)), power=cfg.poly_power,
                             warmup=cfg.warmup)

    paths = {name: os.path.join(cfg.out, f"{name}{ext}")
             for name, ext in (("checkpoint", ".npz"), ("best", ".npz"), ("metrics", ".jsonl"))}
    ckpt = paths["checkpoint"]
    history, start_epoch = [], 0
    if comm.rank == 0:  # rank 0 alone reads and writes the run folder
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.resume:
            history, start_epoch = _resume(ckpt, cfg, model, optimizer, num_classes)
            # metrics.jsonl as the checkpoint has it (written with it; rewritten in case an older run left more)
            atomic_write_all([(paths["metrics"], _metrics_writer(history), ".tmp")])
            log(f"resuming from {ckpt} at epoch {start_epoch + 1}"
                + (" (--init-from applies to a fresh start only)" if cfg.init_from else ""))
        elif cfg.overwrite:
            _remove_run_files(cfg.out, log)
    # Every rank starts from rank 0's parameters, momentum and place in the schedule.
    history, start_epoch = comm.broadcast_object((history, start_epoch))
    comm.broadcast_arrays([p.data for p in model.parameters()] + list(optimizer.state_dict().values()))
    if comm.rank > 0:
        _rank_dropout_streams(model, cfg.seed, comm.rank, start_epoch)
    average_gradients = comm.gradient_averager(optimizer.named_params)
    best = max((row["mean_iu"] for row in history if not math.isnan(row["mean_iu"])), default=-1.0)

    log(f"training {cfg.model} (width {cfg.width}, {model.num_parameters(True):,} learnable parameters) on "
        f"{cfg.dataset}: {len(train_set)} train / {len(val_set)} val images"
        + (f" (training on random {crop} x {crop} crops, scored whole)" if crop else "")
        + f", {cfg.epochs} epochs, device {device}"
        + (f", {comm.size} ranks x batch {cfg.batch_size} ({comm.name})" if comm.size > 1 else ""))
    show_progress = cfg.progress and comm.rank == 0
    iteration = start_epoch * len(train_loader)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        losses = []
        batches = with_next(train_loader.epoch(epoch))
        if show_progress:
            from tqdm import tqdm  # noqa: PLC0415
            batches = tqdm(batches, total=len(train_loader), desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           leave=False, dynamic_ncols=True)
        # The loss of the global batch and this rank's share of its gradient; the counts they need travel
        # with the previous step's gradients (distributed.StepLoss), so a step is one exchange.
        step_loss = StepLoss(comm, loss_fn, lambda labels: pixel_count(loss_fn, labels, model, cfg.dtype, device))
        for (images, labels), upcoming in batches:
            optimizer.lr = schedule(iteration)
            model.zero_grad()
            logits = model(to_device(images, device).astype(cfg.dtype, copy=False))
            loss_fn(logits, to_device(labels, device))
            model.backward(loss_fn.backward(step_loss.scale(labels)))
            next_labels = None if upcoming is None else upcoming[1]  # its count goes with these gradients
            loss = step_loss.loss(average_gradients(extra=step_loss.values(next_labels)))
            if not math.isfinite(loss):  # before the step: the weights stay as they were
                raise TrainingDiverged(_divergence_message(f"loss is {loss}", epoch + 1, iteration, cfg, ckpt))
            optimizer.step()
            losses.append(loss)
            iteration += 1
            if show_progress:
                batches.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{optimizer.lr:.3g}")
        # Nothing is written unless the weights and the validation logits are finite. The weights are the
        # same on every rank; a rank whose shard gives non-finite logits stops the job (cli.fail).
        bad = _nonfinite_weights(model)
        preview = range(min(cfg.num_preview, len(val_set)))  # the first held-out images, drawn as predicted
        try:
            scores = None if bad else evaluate(model, val_loader, num_classes, device, comm, keep=preview)
        except NonFiniteLogits as exc:
            bad = str(exc).replace("the model's logits hold", "the validation logits hold")
        if bad:
            raise TrainingDiverged(_divergence_message(bad, epoch + 1, iteration, cfg, ckpt))
        predictions = gather_predictions(comm, scores.get("kept", {}), len(preview))
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "pixel_acc": scores["pixel_acc"], "mean_acc": scores["mean_acc"], "mean_iu": scores["mean_iu"],
               "fwiu": scores["fwiu"], "per_class_iu": scores["per_class_iu"], "lr": optimizer.lr,
               "seconds": time.perf_counter() - t0, "step_loss": [float(f"{v:.5g}") for v in losses]}
        history.append(row)
        improved = scores["mean_iu"] > best
        best = max(best, scores["mean_iu"]) if improved else best
        if comm.rank == 0:
            _commit_epoch(paths, model, optimizer, cfg, epoch, history, class_names, improved)
            plot_training(history, os.path.join(cfg.out, "loss.png"))
            write_predictions(val_set, predictions, os.path.join(cfg.out, "predictions.png"), class_names)
        comm.barrier()  # the epoch's files are whole on disk before any rank goes on (and may fail)
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f}  pixel acc {row['pixel_acc']:.4f}  "
            f"mean IU {row['mean_iu']:.4f}  fw IU {row['fwiu']:.4f}  ({row['seconds']:.1f} s)")
    return history


def write_predictions(dataset, predictions, path, class_names):
    """Save images | ground truth | prediction for the first ``len(predictions)`` samples of ``dataset``
    (``predictions``: their predicted labels, as scored by :func:`evaluate`)."""
    if not predictions:
        return
    samples = [dataset[i] for i in range(len(predictions))]
    prediction_grid([image for image, _ in samples], [np.asarray(label) for _, label in samples], predictions, path,
                    class_names=class_names)
