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

from .backend import get_array_module, to_numpy


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (and no warning) if there are none."""
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else math.nan


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
        """
        xp = get_array_module(pred, label)
        pred, label = xp.asarray(pred), xp.asarray(label)
        if pred.shape != label.shape:
            raise ValueError(f"ConfusionMatrix.update: pred shape {pred.shape} != label shape {label.shape}")
        for name, a in (("pred", pred), ("label", label)):
            if a.dtype.kind not in "iub":
                raise ValueError(f"ConfusionMatrix.update: {name} must be an integer array, got {a.dtype}")
        label, pred = label.ravel().astype(xp.int64), pred.ravel().astype(xp.int64)
        if self.ignore_index is not None:
            keep = label != self.ignore_index
            label, pred = label[keep], pred[keep]
        c = self.num_classes
        for name, a in (("label", label), ("prediction", pred)):
            bad = (a < 0) | (a >= c)
            if bool(bad.any()):
                raise ValueError(f"ConfusionMatrix.update: {name} value {int(a[bad][0])} is out of range for "
                                 f"{c} classes (valid: 0..{c - 1}"
                                 + (f", or ignore_index={self.ignore_index})" if name == "label" else ")"))
        counts = xp.bincount(c * label + pred, minlength=c * c).reshape(c, c)
        self.matrix += to_numpy(counts).astype(np.int64)

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
