"""Pascal VOC 2012 segmentation: JPEG images and palette-PNG class-index masks.

Layout (``root`` is the ``VOC2012`` folder; ``root/VOCdevkit/VOC2012`` and
``root/VOC2012`` are found too)::

    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png          mode 'P': pixel = class index, 255 = boundary/ignore
    root/ImageSets/Segmentation/<split>.txt  one id per line
"""
from __future__ import annotations

import os

from .checks import DatasetError, check_sample, read_image, read_mask

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def find_voc_root(root) -> str:
    """The folder under ``root`` that holds ``JPEGImages``; DatasetError naming ``root`` if none."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise DatasetError(f"VOC dataset folder not found: {root}")
    for candidate in (root, os.path.join(root, "VOC2012"), os.path.join(root, "VOCdevkit", "VOC2012")):
        if os.path.isdir(os.path.join(candidate, "JPEGImages")):
            return candidate
    raise DatasetError(f"VOC dataset folder {root} has no JPEGImages/ folder (nor VOC2012/JPEGImages or "
                       f"VOCdevkit/VOC2012/JPEGImages); point data_dir at the VOC2012 folder")


class VOCSegmentation:
    """Pascal VOC segmentation split, loaded lazily.

    Args:
        root: the VOC2012 folder (or a folder containing ``VOC2012`` or ``VOCdevkit/VOC2012``).
        split: name of a list in ``ImageSets/Segmentation`` ('train', 'val', 'trainval', ...).

    ``ds[i] -> (image uint8 (H, W, 3), label uint8 (H, W))``, labels 0..20 or 255.
    ``ds.files[i] = (image_path, mask_path)``. Raises DatasetError for a missing
    folder, a missing split file or an empty split.
    """

    num_classes = len(VOC_CLASSES)
    class_names = list(VOC_CLASSES)

    def __init__(self, root, split: str = "train"):
        self.root = find_voc_root(root)
        self.split = split
        split_file = os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt")
        if not os.path.isfile(split_file):
            folder = os.path.dirname(split_file)
            found = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt")) if os.path.isdir(folder) else []
            raise DatasetError(f"VOC split file not found: {split_file} (split {split!r}; "
                               f"splits available: {found or 'none'})")
        with open(split_file) as f:
            ids = [line.strip() for line in f if line.strip()]
        if not ids:
            raise DatasetError(f"VOC split file {split_file} is empty: no image ids")
        self.ids = ids
        self.files = [(os.path.join(self.root, "JPEGImages", f"{i}.jpg"),
                       os.path.join(self.root, "SegmentationClass", f"{i}.png")) for i in ids]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        image_path, mask_path = self.files[i]
        if not os.path.isfile(mask_path) and os.path.isfile(image_path):
            raise DatasetError(f"image without mask: {image_path} (expected {mask_path})")
        image, label = read_image(image_path), read_mask(mask_path)
        check_sample(image, label, f"{mask_path} (image {image_path})")
        return image, label

    def __repr__(self) -> str:
        return f"VOCSegmentation(root={self.root!r}, split={self.split!r}, {len(self)} images)"
