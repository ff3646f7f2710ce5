"""Batches of (images, labels) with reproducible shuffling and augmentation.

Everything random in epoch ``e`` comes from seeds built from ``(seed, e)``:
the order from ``[seed, e, 1]`` and the crop/flip of dataset sample ``idx``
from ``[seed, e, 2, idx]``. So ``loader.epoch(e)`` gives the same batches
whether training started at epoch 0 or resumed at epoch ``e``.

Sharding (data-parallel training, :mod:`minifcn.distributed`): with
``num_shards=N`` an epoch is cut into global batches of ``N * batch_size``
samples, and shard ``r`` yields samples ``r*b .. r*b + b - 1`` of each. As a
sample's augmentation depends only on ``(seed, e, idx)``, the N shards
together see exactly the batches, crops and flips of one unsharded loader of
batch size ``N * b``, and each shard draws its own augmentation stream.
"""
from __future__ import annotations

import numpy as np

from .transforms import IMAGENET_MEAN_RGB, random_crop, random_flip, size_pair, to_tensor


class DataLoader:
    """Iterate over a dataset in batches of NumPy arrays.

    Args:
        dataset: ``len(dataset)`` and ``dataset[i] -> (image uint8 (H, W, 3), label (H, W))``.
        batch_size: samples per batch. With batch_size > 1 every sample of a
            batch must have the same size after cropping.
        shuffle: new random order each epoch.
        seed: base seed of the order and the augmentation.
        crop_size: int or (h, w): random crop (padding small images) when set.
        flip: random horizontal flip.
        mean, bgr, scale: passed to :func:`to_tensor`.
        drop_last: drop a last, smaller (global) batch.
        num_shards, shard: split each global batch of ``num_shards *
            batch_size`` samples between ``num_shards`` loaders; this one
            yields part ``shard`` (0-based). A shard whose part of a last,
            smaller batch is empty skips it.

    Yields: images float32 (N, 3, H, W), labels int64 (N, H, W).
    """

    def __init__(self, dataset, batch_size: int = 1, shuffle: bool = False, seed: int = 0, crop_size=None,
                 flip: bool = False, mean=IMAGENET_MEAN_RGB, bgr: bool = False, scale: float = 1.0,
                 drop_last: bool = False, num_shards: int = 1, shard: int = 0):
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive int, got {batch_size!r}")
        if int(num_shards) != num_shards or num_shards < 1 or int(shard) != shard or not 0 <= shard < num_shards:
            raise ValueError(f"DataLoader: need num_shards >= 1 and 0 <= shard < num_shards, got "
                             f"num_shards={num_shards!r}, shard={shard!r}")
        if crop_size is not None:
            size_pair(crop_size, "DataLoader crop_size")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.crop_size, self.flip = bool(shuffle), int(seed), crop_size, bool(flip)
        self.mean, self.bgr, self.scale, self.drop_last = mean, bool(bgr), float(scale), bool(drop_last)
        self.num_shards, self.shard = int(num_shards), int(shard)

    def __len__(self) -> int:
        """Batches per epoch (global batches when sharded: the same on every shard)."""
        n, b = len(self.dataset), self.batch_size * self.num_shards
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        return self.epoch(0)

    def order(self, epoch: int) -> np.ndarray:
        """Dataset indices in the order epoch ``epoch`` visits them. int64 (len(dataset),)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch, 1]).permutation(n)

    def batch_indices(self, epoch: int):
        """The dataset indices of each batch :meth:`epoch` yields, in order (this shard's part of each global
        batch). int64 arrays."""
        order = self.order(epoch)
        b, step = self.batch_size, self.batch_size * self.num_shards
        for start in range(0, len(self) * step, step):
            part = order[start:start + step][self.shard * b:(self.shard + 1) * b]
            if len(part):
                yield part

    def epoch(self, epoch: int):
        """Iterator over the batches of epoch ``epoch``; depends only on (seed, epoch)."""
        for part in self.batch_indices(epoch):
            yield self._batch(part, epoch)

    def _sample(self, idx: int, epoch: int):
        image, label = self.dataset[int(idx)]
        if self.crop_size is not None or self.flip:
            rng = np.random.default_rng([self.seed, epoch, 2, int(idx)])
            if self.crop_size is not None:
                image, label = random_crop(image, label, self.crop_size, rng, fill=self.mean)
            if self.flip:
                image, label = random_flip(image, label, rng)
        return image, label

    def _batch(self, indices, epoch: int):
        samples = [self._sample(i, epoch) for i in indices]
        sizes = [label.shape for _, label in samples]
        if any(s != sizes[0] for s in sizes):
            k = next(j for j, s in enumerate(sizes) if s != sizes[0])
            raise ValueError(f"DataLoader: samples of one batch differ in size: sample {int(indices[0])} is "
                             f"{sizes[0][1]}x{sizes[0][0]} (WxH) but sample {int(indices[k])} is "
                             f"{sizes[k][1]}x{sizes[k][0]}; use batch_size=1 or set crop_size")
        images = to_tensor(np.stack([image for image, _ in samples]), self.mean, self.bgr, self.scale)
        labels = np.stack([label for _, label in samples]).astype(np.int64)
        return images, labels
