"""Per-pixel losses: softmax cross-entropy and sigmoid binary cross-entropy.

``forward(logits, labels)`` returns the loss as a Python float and keeps what
``backward()`` needs; ``backward(scale=1.0)`` returns d(scale * loss)/dlogits.
Each forward also keeps ``loss_sum`` (the weighted sum of the pixel losses)
and ``count`` (the weighted number of counted pixels, the divisor of
'mean'): training over several processes adds these up across them
(:func:`minifcn.distributed.global_loss`, :class:`~minifcn.distributed.StepLoss`). ``count_of(labels,
logits_shape, dtype)`` gives the same ``count`` from the labels alone, before
any forward pass (the same arithmetic, the same bits).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy
from ..module import Module
from ._checks import check_nchw, check_same_device, need_forward

_REDUCTIONS = ("mean", "sum")


def _label_masks(labels, logits, layer, num_classes, ignore_index):
    """``(counted, bad)`` boolean masks of integer labels (N, H, W): counted pixels hold a label in
    [0, num_classes); bad ones hold neither such a label nor ignore_index.

    Nothing is read back from the device here: the caller brings the number of
    bad pixels to the host together with the loss (one transfer a call) and
    then raises :func:`_raise_bad_label`. Bad pixels are left out of
    ``counted``, so the arithmetic before that check never indexes out of range.
    """
    if not hasattr(labels, "dtype") or labels.dtype.kind not in "iub":
        kind = getattr(getattr(labels, "dtype", None), "name", type(labels).__name__)
        raise ValueError(f"{layer}: labels must be an integer array, got {kind}")
    n, _, h, w = logits.shape
    if labels.shape != (n, h, w):
        raise ValueError(f"{layer}: labels must have shape (N, H, W) = {(n, h, w)}, got {tuple(labels.shape)}")
    check_same_device(labels, logits, layer, "labels", "logits")
    in_range = (labels >= 0) & (labels < num_classes)
    if ignore_index is None:
        return in_range, ~in_range
    ignored = labels == ignore_index
    return in_range & ~ignored, ~(in_range | ignored)


def _raise_bad_label(labels, bad, layer, num_classes, ignore_index):
    value = int(labels[bad].ravel()[0])
    raise ValueError(f"{layer}: label {value} is out of range for {num_classes} classes "
                     f"(valid: 0..{num_classes - 1}, or ignore_index={ignore_index})")


def _to_host(xp, *scalars):
    """Device scalars as Python floats, in one transfer (one device sync on the GPU)."""
    return to_numpy(xp.stack([xp.asarray(v, dtype=xp.float64) for v in scalars])).tolist()


def _shape_only(labels, logits_shape, dtype):
    """A stand-in for logits of ``logits_shape`` and ``dtype`` on ``labels``' device, for the checks and
    dtypes of the pixel weights (``count_of``): one zero broadcast, no memory of that size."""
    xp = get_array_module(labels)
    if len(logits_shape) != 4:
        raise ValueError(f"count_of: logits_shape must be (N, C, H, W), got {tuple(logits_shape)}")
    return xp.broadcast_to(xp.zeros((), dtype=dtype), tuple(int(d) for d in logits_shape))


def _soft_target_masks(targets, logits, layer, ignore_index):
    """Float targets (N, H, W) in [0, 1] (soft targets, as PyTorch's binary_cross_entropy_with_logits
    takes) or equal to ignore_index: the masks (counted, bad), as :func:`_label_masks`."""
    n, _, h, w = logits.shape
    if targets.shape != (n, h, w):
        raise ValueError(f"{layer}: targets must have shape (N, H, W) = {(n, h, w)}, got {tuple(targets.shape)}")
    check_same_device(targets, logits, layer, "targets", "logits")
    in_range = (targets >= 0) & (targets <= 1)                          # NaN is outside
    if ignore_index is None:
        return in_range, ~in_range
    ignored = targets == ignore_index
    return in_range & ~ignored, ~(in_range | ignored)


def _raise_bad_soft_target(targets, bad, layer, ignore_index):
    raise ValueError(f"{layer}: float targets must lie in [0, 1] (or equal ignore_index={ignore_index}), "
                     f"got {float(targets[bad].ravel()[0])} at {int(bad.sum())} pixel(s)")


class SoftmaxCrossEntropy(Module):
    """Softmax over channels, then the negative log-likelihood of each pixel's label.

    ``loss_p = -log softmax(z_p)[y_p] = logsumexp(z_p) - z_p[y_p]`` computed
    stably (the per-pixel maximum is subtracted first), and
    ``dloss_p/dz_p = softmax(z_p) - onehot(y_p)``.

    Args:
        ignore_index: label whose pixels contribute nothing (255 in VOC).
        reduction: 'mean' divides by the (weighted) number of counted pixels,
            'sum' adds them (the FCN reference: hence its tiny learning rates).
            A batch with no counted pixel gives loss 0 and zero gradient.
        class_weight: optional (C,) weights; with 'mean' the divisor is the sum
            of the counted pixels' weights (PyTorch's convention).

    Inputs: logits (N, C, H, W) float; labels (N, H, W) integer.
    Loop twins: :func:`minifcn.reference.softmax_cross_entropy` and its ``_backward``.
    """

    def __init__(self, ignore_index: int | None = 255, reduction: str = "mean", class_weight=None):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"SoftmaxCrossEntropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.class_weight = None if class_weight is None else np.asarray(class_weight, dtype=np.float64)
        if self.class_weight is not None and not (np.isfinite(self.class_weight).all() and (self.class_weight >= 0).all()):
            k = int(np.flatnonzero(~(np.isfinite(self.class_weight) & (self.class_weight >= 0)))[0])
            raise ValueError(f"SoftmaxCrossEntropy: class_weight must be finite and >= 0, got {self.class_weight[k]} "
                             f"for class {k}")
        self._cache = self.loss_sum = self.count = None

    def _weights(self, logits, labels):
        """``(safe, weight, bad)``: the labels with uncounted pixels set to 0 (int64), each pixel's weight
        in the logits' dtype (0 where not counted, else 1 or its class's weight), the bad-label mask."""
        xp = get_array_module(logits)
        c = logits.shape[1]
        valid, bad = _label_masks(labels, logits, "SoftmaxCrossEntropy", c, self.ignore_index)
        if self.class_weight is not None and self.class_weight.shape != (c,):
            raise ValueError(f"SoftmaxCrossEntropy: class_weight must have shape ({c},), got {self.class_weight.shape}")
        safe = xp.where(valid, labels, 0).astype(xp.int64)
        weight = valid.astype(logits.dtype)
        if self.class_weight is not None:
            weight = weight * xp.asarray(self.class_weight.astype(logits.dtype))[safe]
        return safe, weight, bad

    def count_of(self, labels, logits_shape, dtype) -> float:
        """The ``count`` a forward pass on ``labels`` and logits of ``logits_shape`` and ``dtype`` keeps."""
        safe, weight, bad = self._weights(_shape_only(labels, logits_shape, dtype), labels)
        total, n_bad = _to_host(get_array_module(labels), weight.sum(), bad.sum())
        if n_bad:
            _raise_bad_label(labels, bad, "SoftmaxCrossEntropy", logits_shape[1], self.ignore_index)
        return total

    def forward(self, logits, labels) -> float:
        check_nchw(logits, "SoftmaxCrossEntropy")
        xp = get_array_module(logits)
        c = logits.shape[1]
        safe, weight, bad = self._weights(logits, labels)
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = xp.exp(shifted)
        sumexp = exp.sum(axis=1, keepdims=True)
        picked = xp.take_along_axis(shifted, safe[:, None], axis=1)[:, 0]
        pixel_loss = xp.log(sumexp[:, 0]) - picked                    # (N, H, W)
        loss_sum, total, n_bad = _to_host(xp, (pixel_loss * weight).sum(), weight.sum(), bad.sum())
        if n_bad:
            _raise_bad_label(labels, bad, "SoftmaxCrossEntropy", c, self.ignore_index)
        norm = (1.0 / total if total > 0 else 0.0) if self.reduction == "mean" else 1.0
        self._cache = (exp / sumexp, safe, weight, norm)
        self.loss_sum, self.count = loss_sum, total
        return loss_sum * norm

    def backward(self, scale: float = 1.0):
        """Returns dlogits (N, C, H, W) = scale * norm * weight * (softmax - onehot).

        Element-wise over (N, C, H, W): ``onehot`` is the boolean comparison of
        each channel's index with the pixel's label, so there is no gather or
        scatter (CuPy has ``put_along_axis`` only from v14).
        """
        prob, safe, weight, norm = need_forward(self._cache, "SoftmaxCrossEntropy")
        xp = get_array_module(prob)
        onehot = safe[:, None] == xp.arange(prob.shape[1])[:, None, None]   # (N, C, H, W) bool
        grad = prob - onehot                                                # float minus bool: stays float
        grad *= (weight * prob.dtype.type(scale * norm))[:, None]
        return grad

    def extra_repr(self):
        return f"ignore_index={self.ignore_index}, reduction={self.reduction!r}"


class SigmoidBinaryCrossEntropy(Module):
    """Binary cross-entropy on sigmoid probabilities, for one-channel masks.

    ``loss_p = max(z, 0) - z t + log(1 + exp(-|z|))`` (stable form of
    ``-t log s(z) - (1-t) log(1 - s(z))``); ``dloss_p/dz = s(z) - t``.

    Inputs: logits (N, 1, H, W); targets (N, H, W) or (N, 1, H, W): integer
    0 or 1, or float in [0, 1] (soft targets, as in PyTorch and Keras); pixels
    equal to ignore_index are not counted. Reduction 'mean' over counted pixels or 'sum'.
    Loop twins: :func:`minifcn.reference.sigmoid_bce` and its ``_backward``.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int | None = 255):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"SigmoidBinaryCrossEntropy: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.ignore_index = ignore_index
        self._cache = self.loss_sum = self.count = None

    def _weights(self, logits, targets):
        """``(targets, t, weight, bad, soft)``: the targets as (N, H, W), the targets with uncounted pixels
        set to 0 and each pixel's weight (0 or 1), both in the logits' dtype, the bad-target mask, and
        whether the targets are soft (float)."""
        xp = get_array_module(logits)
        if hasattr(targets, "ndim") and targets.ndim == 4:
            if targets.shape[1] != 1:
                raise ValueError(f"SigmoidBinaryCrossEntropy: targets must be (N, H, W) or (N, 1, H, W), got {tuple(targets.shape)}")
            targets = targets[:, 0]
        soft = getattr(getattr(targets, "dtype", None), "kind", None) == "f"  # soft targets in [0, 1]
        if soft:
            valid, bad = _soft_target_masks(targets, logits, "SigmoidBinaryCrossEntropy", self.ignore_index)
        else:
            valid, bad = _label_masks(targets, logits, "SigmoidBinaryCrossEntropy", 2, self.ignore_index)
        t = xp.where(valid, targets, 0).astype(logits.dtype)
        return targets, t, valid.astype(logits.dtype), bad, soft

    def _raise_bad(self, targets, bad, soft):
        if soft:
            _raise_bad_soft_target(targets, bad, "SigmoidBinaryCrossEntropy", self.ignore_index)
        _raise_bad_label(targets, bad, "SigmoidBinaryCrossEntropy", 2, self.ignore_index)

    def count_of(self, targets, logits_shape, dtype) -> float:
        """The ``count`` a forward pass on ``targets`` and logits of ``logits_shape`` and ``dtype`` keeps."""
        targets, _, weight, bad, soft = self._weights(_shape_only(targets, logits_shape, dtype), targets)
        count, n_bad = _to_host(get_array_module(targets), weight.sum(), bad.sum())
        if n_bad:
            self._raise_bad(targets, bad, soft)
        return count

    def forward(self, logits, targets) -> float:
        check_nchw(logits, "SigmoidBinaryCrossEntropy", 1)
        xp = get_array_module(logits)
        targets, t, weight, bad, soft = self._weights(logits, targets)
        z = logits[:, 0]
        e = xp.exp(-xp.abs(z))                                        # in (0, 1]: never overflows
        pixel_loss = xp.maximum(z, 0) - z * t + xp.log1p(e)
        loss_sum, count, n_bad = _to_host(xp, (pixel_loss * weight).sum(), weight.sum(), bad.sum())
        if n_bad:
            self._raise_bad(targets, bad, soft)
        norm = (1.0 / count if count > 0 else 0.0) if self.reduction == "mean" else 1.0
        prob = xp.where(z >= 0, 1 / (1 + e), e / (1 + e))             # sigmoid(z) without exp(-z)
        self._cache = (prob, t, weight, norm)
        self.loss_sum, self.count = loss_sum, count
        return loss_sum * norm

    def backward(self, scale: float = 1.0):
        """Returns dlogits (N, 1, H, W) = scale * norm * weight * (sigmoid(z) - t)."""
        prob, t, weight, norm = need_forward(self._cache, "SigmoidBinaryCrossEntropy")
        return ((prob - t) * weight * prob.dtype.type(scale * norm))[:, None]

    def extra_repr(self):
        return f"reduction={self.reduction!r}"
