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


class FolderDataset:
    """Images in ``root/images`` paired by file stem with masks in ``root/masks``.

    Args:
        root: folder holding ``images/`` and ``masks/``.
        num_classes: number of classes; None infers max label + 1 (255 excluded)
            by reading every mask the first time ``num_classes`` is asked for.
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
                top = 0
                for _, mask_path in self.files:
                    values = np.unique(read_mask(mask_path))
                    values = values[values != IGNORE_LABEL]
                    top = max(top, int(values.max()) if values.size else 0)
                self._num_classes = top + 1
        return self._num_classes

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
