"""Reading image and mask files, and checking a dataset before training starts.

Every problem with the data is reported as a :class:`DatasetError` whose
message names the offending file (or sample) and the offending value, so a
bad file is found in seconds instead of crashing an epoch later.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

IGNORE_LABEL = 255
_MAX_LISTED = 20  # problems listed in one DatasetError message


class DatasetError(ValueError):
    """A dataset file or folder is missing, unreadable, or inconsistent."""


def read_image(path) -> np.ndarray:
    """Decode an image file to RGB.

    Returns: uint8 array (H, W, 3).
    Raises DatasetError naming ``path`` if the file is missing or PIL cannot decode it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decode fully, so a truncated file fails here and not later
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        raise DatasetError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def read_mask(path) -> np.ndarray:
    """Decode a label mask whose pixel values are class indices (255 = ignore).

    Palette ('P') PNGs such as VOC's SegmentationClass are decoded to their
    palette *indices*, not to colours; greyscale ('L') masks are read as they are.

    Returns: uint8 array (H, W).
    Raises DatasetError naming ``path`` if the file is missing, unreadable, or
    not a single-channel index image (for example an RGB colour mask).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DatasetError(f"mask file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "L", "1"):
                return np.array(im, dtype=np.uint8)
            if mode.startswith("I"):  # 16/32-bit greyscale: fine if the values fit in 0..255
                a = np.asarray(im)
                if a.size and (a.min() < 0 or a.max() > 255):
                    raise DatasetError(f"mask {path} has label value {int(a.max() if a.max() > 255 else a.min())} "
                                       f"outside 0..255 (mode {mode!r})")
                return a.astype(np.uint8)
    except DatasetError:
        raise
    except Exception as e:
        raise DatasetError(f"cannot read mask {path}: {type(e).__name__}: {e}") from None
    raise DatasetError(f"mask {path} has mode {mode!r}; expected a single-channel PNG of class indices "
                       f"(mode 'P' or 'L', 255 = ignore), not a colour image")


def check_sample(image, label, name: str, num_classes: int | None = None) -> None:
    """Check one (image, label) pair; raise DatasetError naming ``name`` on the first problem.

    Inputs: image uint8 (H, W, 3); label integer (H, W), values in
    [0, num_classes) or 255. ``num_classes=None`` skips the label-range check.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise DatasetError(f"{name}: image must have shape (H, W, 3), got {tuple(image.shape)}")
    if label.ndim != 2:
        raise DatasetError(f"{name}: mask must have shape (H, W), got {tuple(label.shape)}")
    if label.shape != image.shape[:2]:
        ih, iw = image.shape[:2]
        lh, lw = label.shape
        raise DatasetError(f"{name}: mask size {lw}x{lh} (WxH) differs from image size {iw}x{ih}")
    if num_classes is not None and label.size:
        lo, hi = int(label.min()), int(label.max())
        if lo < 0 or hi > IGNORE_LABEL:
            raise DatasetError(f"{name}: label value {lo if lo < 0 else hi} is outside 0..{IGNORE_LABEL}")
        values = np.flatnonzero(np.bincount(label.ravel().astype(np.intp)))
        bad = values[(values >= num_classes) & (values != IGNORE_LABEL)]
        if bad.size:
            raise DatasetError(f"{name}: label value {int(bad[0])} >= num_classes={num_classes} "
                               f"(valid labels are 0..{num_classes - 1} and {IGNORE_LABEL} = ignore; "
                               f"out-of-range values found: {bad.tolist()})")


def sample_name(dataset, i: int) -> str:
    """A readable name of sample ``i``: its file paths when the dataset has ``.files``."""
    files = getattr(dataset, "files", None)
    if files is not None:
        image_path, mask_path = files[i]
        return f"{mask_path} (image {image_path})"
    return f"{type(dataset).__name__}[{i}]"


def validate_dataset(dataset, num_classes: int):
    """Check every sample of ``dataset`` before training starts.

    Reads each sample (``dataset[i] -> (image uint8 (H, W, 3), label uint8 (H, W))``)
    and collects: unreadable or corrupt images and masks, images without masks,
    masks without images (``dataset.orphan_masks``), mask/image size mismatches,
    and labels >= ``num_classes`` other than 255. Raises one DatasetError listing
    the problems (each naming its file and value). If all is well, returns the
    number of pixels of each class, (num_classes,) int64 (255 not counted),
    read on the way (for class-balanced loss weights).
    """
    n = len(dataset)
    if n == 0:
        raise DatasetError(f"dataset {type(dataset).__name__} is empty: no samples to train on")
    problems = [f"mask without image: {p}" for p in getattr(dataset, "orphan_masks", [])]
    counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(n):
        try:
            image, label = dataset[i]
            check_sample(image, label, sample_name(dataset, i), num_classes)
            counts += np.bincount(label.ravel(), minlength=max(256, num_classes))[:num_classes]
        except DatasetError as e:
            problems.append(str(e))
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DatasetError(f"{len(problems)} problem(s) in dataset {type(dataset).__name__} "
                           f"({n} samples):\n  {listed}{more}")
    return counts


def check_learnable(dataset, pixel_counts) -> None:
    """Refuse a training set a model cannot learn from, before the first step.

    ``pixel_counts``: (num_classes,) labelled pixels per class, as
    :func:`validate_dataset` returns them. Raises DatasetError when no pixel
    is labelled (every mask all 255 = ignore: the loss would be 0/0) or when
    only one class occurs (a one-class model scores a mean IU of 1.0 by
    predicting that class everywhere).
    """
    counts = np.asarray(pixel_counts)
    where = getattr(dataset, "root", None) or type(dataset).__name__
    hint = (f"masks hold class indices 0, 1, 2, ... with {IGNORE_LABEL} = ignore; a black-and-white mask (0 and "
            f"{IGNORE_LABEL}) marks its objects as ignored: write them as 1")
    if counts.sum() == 0:
        raise DatasetError(f"dataset {where}: every pixel of its {len(dataset)} training mask(s) is "
                           f"{IGNORE_LABEL} (ignore), so there is nothing to learn from ({hint})")
    present = np.flatnonzero(counts)
    if present.size < 2:
        c = int(present[0])
        raise DatasetError(f"dataset {where}: every labelled pixel of its {len(dataset)} training mask(s) is class "
                           f"{c} ({int(counts[c])} pixels), and a model needs at least two classes to learn to tell "
                           f"apart ({hint})")
