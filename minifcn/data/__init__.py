"""Datasets (synthetic shapes, Pascal VOC, a folder of your own), checks, transforms, loader."""
from __future__ import annotations

import os

from .checks import DatasetError, check_learnable, check_sample, read_image, read_mask, validate_dataset
from .folder import FolderDataset
from .loader import DataLoader
from .shapes import SHAPES_CLASSES, ShapesDataset
from .transforms import IMAGENET_MEAN_RGB, random_crop, random_flip, to_tensor
from .voc import VOC_CLASSES, VOCSegmentation

DATASETS = ("shapes", "voc", "folder")

__all__ = ["DATASETS", "DataLoader", "DatasetError", "FolderDataset", "IMAGENET_MEAN_RGB", "SHAPES_CLASSES",
           "ShapesDataset", "VOCSegmentation", "VOC_CLASSES", "check_learnable", "check_sample", "get_dataset", "random_crop",
           "random_flip", "read_image", "read_mask", "to_tensor", "validate_dataset"]


def get_dataset(name: str, data_dir=None, split: str = "train", **kw):
    """Build a dataset by name.

    - 'shapes': ``ShapesDataset(split, **kw)``; ``data_dir`` is ignored.
    - 'voc': ``VOCSegmentation(data_dir, split)``.
    - 'folder': ``FolderDataset(data_dir/<split>, **kw)`` when that folder exists,
      else ``FolderDataset(data_dir, **kw)`` for split 'train' only (a lone
      folder is never silently reused as the val split). A missing folder
      is a DatasetError.
    """
    if name == "shapes":
        return ShapesDataset(split=split, **kw)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (the folder holding the data)")
    if name == "voc":
        return VOCSegmentation(data_dir, split=split, **kw)
    split_dir = os.path.join(os.fspath(data_dir), split)
    if os.path.isdir(split_dir):
        return FolderDataset(split_dir, **kw)
    if split == "train" and os.path.isdir(os.path.join(os.fspath(data_dir), "images")):
        return FolderDataset(data_dir, **kw)
    also = f" (or {os.fspath(data_dir)}/images/ for the train split)" if split == "train" else ""
    raise DatasetError(f"folder dataset {os.fspath(data_dir)} has no {split!r} split: expected "
                       f"{split_dir}/images/ and {split_dir}/masks/{also}")
