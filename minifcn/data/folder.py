"""A folder of images and same-named index masks: the layout for your own data.

Layout::

    root/images/<stem>.png|.jpg|.jpeg
    root/masks/<stem>.png     mode 'P' or 'L': pixel = class index, 255 = ignore
"""
from __future__ import annotations

import os

import numpy as np

from .checks import IGNORE_LABEL, DatasetError, check_sample, read_image, read_mask

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
GAP_LIMIT = 8  # classes that never occur that an inferred class count may hold (a subset of VOC's 21 lacks some)


class FolderDataset:
    """Images in ``root/images`` paired by file stem with masks in ``root/masks``.

    Args:
        root: folder holding ``images/`` and ``masks/``.
        num_classes: number of classes; None infers max label + 1 (255 excluded)
            by reading every mask the first time ``num_classes`` is asked for,
            and refuses to when that would make more than ``GAP_LIMIT`` classes that
            never occur, and more of them than classes that do (a stray value 200
            among 0, 1, 2 would make 201 classes): pass it then.
        class_names: optional names; default 'class_0', 'class_1', ...

    ``ds[i] -> (image uint8 (H, W, 3), label uint8 (H, W))``. ``ds.files`` lists
    (image_path, mask_path) pairs sorted by stem; ``ds.orphan_masks`` lists masks
    with no image. Images with no mask are listed too and fail when read (and in
    :func:`validate_dataset`).
    """

    def __init__(self, root, num_classes: int | None = None, class_names=None):
        root = os.fspath(root)
        image_dir, mask_dir = os.path.join(root, "images"), os.path.join(root, "masks")
        for folder in (root, image_dir, mask_dir):
            if not os.path.isdir(folder):
                raise DatasetError(f"dataset folder not found: {folder} (expected {root}/images/ and {root}/masks/)")
        stems = {}
        for name in sorted(os.listdir(image_dir)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                if stem in stems:
                    raise DatasetError(f"two images share the stem {stem!r}: {stems[stem]} and "
                                       f"{os.path.join(image_dir, name)}")
                stems[stem] = os.path.join(image_dir, name)
        if not stems:
            raise DatasetError(f"no images found in {image_dir} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        self.root = root
        self.files = [(path, os.path.join(mask_dir, stem + ".png")) for stem, path in stems.items()]
        self.orphan_masks = sorted(os.path.join(mask_dir, m) for m in os.listdir(mask_dir)
                                   if m.lower().endswith(".png") and os.path.splitext(m)[0] not in stems)
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"FolderDataset: num_classes must be a positive int, got {num_classes!r}")
        self._num_classes = None if num_classes is None else int(num_classes)
        self._class_names = None if class_names is None else list(class_names)
        if self._class_names is not None and self._num_classes is not None \
                and len(self._class_names) != self._num_classes:
            raise ValueError(f"FolderDataset: {len(self._class_names)} class_names given for "
                             f"num_classes={self._num_classes}")

    @property
    def num_classes(self) -> int:
        """Given, or the largest label found in the masks + 1 (255 = ignore excluded)."""
        if self._num_classes is None:
            if self._class_names is not None:
                self._num_classes = len(self._class_names)
            else:
                self._num_classes = self._infer_num_classes()
        return self._num_classes

    def _infer_num_classes(self) -> int:
        counts = np.zeros(256, dtype=np.int64)
        first = {}  # label value -> (first mask holding it, its pixels there)
        for _, mask_path in self.files:
            if not os.path.isfile(mask_path):
                continue  # an image without mask: reported by validate_dataset
            c = np.bincount(read_mask(mask_path).ravel(), minlength=256)
            for v in np.flatnonzero(c):
                first.setdefault(int(v), (mask_path, int(c[v])))
            counts += c
        counts[IGNORE_LABEL] = 0
        values = np.flatnonzero(counts)
        top = int(values.max()) if values.size else 0
        never = top + 1 - values.size
        if never > max(values.size, GAP_LIMIT):  # e.g. 0, 1, 2 and one stray 200: 201 classes, 197 never occur
            cut = int(np.argmax(np.diff(values))) + 1 if values.size > 1 else 0
            stray = "; ".join(f"value {v} ({counts[v]} pixel(s), first in {first[v][0]}: {first[v][1]} there)"
                              for v in values[cut:cut + 5].tolist())
            raise DatasetError(
                f"folder dataset {self.root}: its masks use the label values {values.tolist()[:12]}"
                f"{' ...' if values.size > 12 else ''}; counting classes up to the largest would make a "
                f"{top + 1}-class model in which {never} classes never occur. Suspicious: {stray}. Fix those "
                f"masks, or give the number of classes (--num-classes N, FolderDataset(num_classes=N)): "
                f"label values >= N are then reported as errors")
        return top + 1

    @property
    def class_names(self) -> list[str]:
        return self._class_names or [f"class_{k}" for k in range(self.num_classes)]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image_path, mask_path = self.files[i]
        if not os.path.isfile(mask_path):
            raise DatasetError(f"image without mask: {image_path} (expected {mask_path})")
        image, label = read_image(image_path), read_mask(mask_path)
        check_sample(image, label, f"{mask_path} (image {image_path})")
        return image, label

    def __repr__(self) -> str:
        return f"FolderDataset(root={self.root!r}, {len(self)} images)"
