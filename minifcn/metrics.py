"""Segmentation scores from a confusion matrix, as in FCN's ``score.py``.

With ``n[i, j]`` = pixels of true class i predicted as j and ``t_i = sum_j n[i, j]``:

- pixel accuracy  ``sum_i n_ii / sum_ij n_ij``
- mean accuracy   ``nanmean_i n_ii / t_i``
- IU_i            ``n_ii / (t_i + sum_j n_ji - n_ii)``; mean IU = nanmean_i IU_i
- frequency-weighted IU  ``sum_i (t_i / sum_k t_k) IU_i``

A class absent from both truth and prediction has IU NaN and is left out of
the mean, as is a class absent from the truth from the mean accuracy.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import elementwise_kernel, get_array_module, to_numpy


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (and no warning) if there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


_COUNT_OPERATION = "atomicAdd(&counts[index], 1ULL)"  # counts[index[i]] += 1, safe against other threads


def count_bins(index, length: int):
    """How often each value ``0 .. length - 1`` occurs in the non-negative int64 array ``index``.

    NumPy: ``np.bincount(index, minlength=length)``. CuPy: one kernel that
    adds 1 to ``counts[index[i]]`` for every ``i`` with an atomic add, because
    ``cupy.bincount`` first reads the input's minimum and maximum back to the
    host (two device syncs) and, before CuPy 14.2, fails on an empty input.
    ``index`` must lie in ``[0, length)`` (the confusion matrix's spare bins see to it).
    """
    xp = get_array_module(index)
    if xp is np:
        return np.bincount(index, minlength=length)
    counts = xp.zeros(length, dtype=xp.uint64)
    kernel = elementwise_kernel("int64 index", "raw uint64 counts", _COUNT_OPERATION, "minifcn_count_bins")
    kernel(index.astype(xp.int64, copy=False), counts)
    return counts


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix over batches.

    ``matrix[i, j]`` counts pixels whose true class is i and predicted class is j.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255):
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"ConfusionMatrix: num_classes must be a positive int, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)

    def reset(self) -> None:
        self.matrix[...] = 0

    def update(self, pred, label) -> None:
        """Count one batch.

        Inputs: pred and label integer arrays of the same shape (any shape,
        e.g. (N, H, W)), both NumPy or both CuPy. Pixels whose label is
        ``ignore_index`` are skipped; the counting runs on the arrays' device.

        No pixel is masked out (masking a CuPy array waits for the device to
        know the result's size): each pixel gets a bin, ``C * label + pred``
        for a counted one and one of three spare bins past the ``C x C``
        matrix for an ignored pixel, a bad label and a bad prediction. One
        count of all bins comes to the host (one transfer); the spare bins
        are dropped, the bad ones checked. A batch whose pixels are all
        ignored counts nothing and needs no special case.
        """
        xp = get_array_module(pred, label)
        pred, label = xp.asarray(pred), xp.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"ConfusionMatrix.update: pred shape {pred.shape} != label shape {label.shape}")
        for name, a in (("pred", pred), ("label", label)):
            if a.dtype.kind not in "iub":
                raise ValueError(f"ConfusionMatrix.update: {name} must be an integer array, got {a.dtype}")
        if label.size == 0:
            return
        c = self.num_classes
        ignored_bin, bad_label_bin, bad_pred_bin = c * c, c * c + 1, c * c + 2
        label, pred = label.ravel().astype(xp.int64), pred.ravel().astype(xp.int64)
        ignored = (label == self.ignore_index) if self.ignore_index is not None else xp.zeros(label.shape, bool)
        label_ok = (label >= 0) & (label < c)
        pred_ok = (pred >= 0) & (pred < c)
        index = xp.where(label_ok & pred_ok, c * label + pred,
                         xp.where(label_ok, bad_pred_bin, bad_label_bin))
        index = xp.where(ignored, ignored_bin, index)
        counts = to_numpy(count_bins(index, c * c + 3))
        for name, a, ok, bin_ in (("label", label, label_ok, bad_label_bin), ("prediction", pred, pred_ok, bad_pred_bin)):
            if counts[bin_]:
                value = int(a[~ok & ~ignored][0])  # an error: reading the device again is fine here
                raise ValueError(f"ConfusionMatrix.update: {name} value {value} is out of range for "
                                 f"{c} classes (valid: 0..{c - 1}"
                                 + (f", or ignore_index={self.ignore_index})" if name == "label" else ")"))
        self.matrix += counts[: c * c].reshape(c, c).astype(np.int64)

    def scores(self) -> dict:
        """``pixel_acc``, ``mean_acc``, ``mean_iu``, ``fwiu`` (floats; NaN when nothing was counted),
        ``per_class_iu`` and ``per_class_acc`` (lists of C floats, NaN where undefined)."""
        n = self.matrix.astype(np.float64)
        diag, truth, predicted, total = np.diag(n), n.sum(1), n.sum(0), n.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = diag / truth
            iu = diag / (truth + predicted - diag)
        return {
            "pixel_acc": float(diag.sum() / total) if total else math.nan,
            "mean_acc": _nanmean(acc),
            "mean_iu": _nanmean(iu),
            "fwiu": float((truth / total * np.nan_to_num(iu)).sum()) if total else math.nan,
            "per_class_iu": iu.tolist(),
            "per_class_acc": acc.tolist(),
        }


def format_scores(scores: dict, class_names=None) -> str:
    """The four scores on one line, then a table of per-class IU and accuracy ('-' for NaN)."""
    def num(v):
        return "     -" if v is None or math.isnan(v) else f"{v:6.4f}"

    lines = [f"pixel acc {num(scores['pixel_acc'])}  mean acc {num(scores['mean_acc'])}  "
             f"mean IU {num(scores['mean_iu'])}  fw IU {num(scores['fwiu'])}"]
    ius = scores.get("per_class_iu", [])
    accs = scores.get("per_class_acc", [None] * len(ius))
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(ius))]
    names += [str(k) for k in range(len(names), len(ius))]
    width = max([len("class")] + [len(s) for s in names])
    lines.append(f"{'class':<{width}}      IU     acc")
    for k, (iu, acc) in enumerate(zip(ius, accs)):
        lines.append(f"{names[k]:<{width}}  {num(iu)}  {num(acc)}")
    return "\n".join(lines)
