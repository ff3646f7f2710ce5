"""Turning uint8 images into network input, and the two training augmentations.

The mean is always given in RGB order and in the 0..255 range. Weights
converted from Caffe (the original FCN/VGG16) expect BGR input minus the BGR
mean, 0..255: use ``bgr=True`` with the default mean.
"""
from __future__ import annotations

import numpy as np

from .checks import IGNORE_LABEL

# Caffe VGG16's mean pixel, written there in BGR order as (104.00699, 116.66877, 122.67892).
IMAGENET_MEAN_RGB = (122.67892, 116.66877, 104.00699)


def to_tensor(image, mean=IMAGENET_MEAN_RGB, bgr: bool = False, scale: float = 1.0) -> np.ndarray:
    """Image(s) to network input: ``(image - mean)``, optional RGB->BGR swap, ``* scale``.

    Inputs: image uint8 (H, W, 3) or a batch (N, H, W, 3), RGB; mean: 3 numbers
    in RGB order (None: subtract nothing).
    Returns: float32 (3, H, W) or (N, 3, H, W).
    """
    image = np.asarray(image)
    if image.ndim not in (3, 4) or image.shape[-1] != 3:
        raise ValueError(f"to_tensor: image must have shape (H, W, 3) or (N, H, W, 3), got {image.shape}")
    x = image.astype(np.float32)
    if mean is not None:
        x -= np.asarray(mean, dtype=np.float32)
    if bgr:
        x = x[..., ::-1]
    if scale != 1.0:
        x *= np.float32(scale)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def size_pair(size, name: str) -> tuple[int, int]:
    """``size`` (an int or (h, w)) as a pair of positive ints; ValueError naming ``name`` otherwise."""
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"{name}: size must be a positive int or (H, W), got {size!r}")
    return int(h), int(w)


def random_crop(image, label, size, rng: np.random.Generator, fill=IMAGENET_MEAN_RGB):
    """Crop the same random window from an image and its label.

    An image smaller than ``size`` is first padded at the bottom and right:
    the image with ``fill`` (the mean colour, so it becomes ~0 after
    :func:`to_tensor`; None pads with zeros), the label with 255 (ignored).

    Inputs: image uint8 (H, W, 3); label (H, W); size int or (h, w).
    Returns: image (h, w, 3), label (h, w), same dtypes.
    """
    ch, cw = size_pair(size, "random_crop")
    h, w = label.shape
    if h < ch or w < cw:
        ph, pw = max(ch, h), max(cw, w)
        colour = np.zeros(3) if fill is None else np.asarray(fill)
        padded = np.empty((ph, pw, 3), image.dtype)
        padded[...] = np.round(colour).astype(image.dtype)
        padded[:h, :w] = image
        padded_label = np.full((ph, pw), IGNORE_LABEL, label.dtype)
        padded_label[:h, :w] = label
        image, label, h, w = padded, padded_label, ph, pw
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return image[top:top + ch, left:left + cw], label[top:top + ch, left:left + cw]


def random_flip(image, label, rng: np.random.Generator, p: float = 0.5):
    """Flip an image (H, W, 3) and its label (H, W) left-right together, with probability ``p``."""
    if rng.random() < p:
        return image[:, ::-1], label[:, ::-1]
    return image, label
