"""A procedurally generated segmentation toy: coloured shapes on textured backgrounds.

Five object classes with distinct geometry (disc, box, triangle, cross, ring)
on smooth, noisy, low-saturation backgrounds. Each class has a characteristic
hue, jittered in hue, saturation and brightness, so colour helps but shape and
boundaries matter (the thin arms of a cross and the thin annulus of a ring are
where FCN-8s beats FCN-32s). Labels are exact: no anti-aliasing.

Image ``i`` of a split is drawn from ``np.random.default_rng([seed, split_id, i])``
alone, so it is the same whatever ``num_images`` is, it can be regenerated on
its own, and the val split (split_id 1) is a fixed set disjoint from train (0).

Rendering costs about 5 ms an image at 128 x 128, which a training run would
pay every epoch; so rendered samples are kept in memory (read-only) up to
``cache_bytes``, 256 MiB by default (the default training set takes 52 MiB).
"""
from __future__ import annotations

import colorsys

import numpy as np

SHAPES_CLASSES = ("background", "disc", "box", "triangle", "cross", "ring")
_SPLIT_IDS = {"train": 0, "val": 1}
_DEFAULT_SIZES = {"train": 512, "val": 128}
_HUES = {1: 0.0, 2: 215.0, 3: 140.0, 4: 55.0, 5: 290.0}  # degrees: red, blue, green, yellow, magenta


class ShapesDataset:
    """Deterministic synthetic dataset of shapes.

    Args:
        split: 'train' or 'val'.
        num_images: number of images; default 512 for train, 128 for val.
        image_size: int or (H, W).
        seed: base seed; the same seed gives the same images.
        cache_bytes: keep rendered samples in memory while they take at most
            this many bytes in all (0: render on every access).

    ``ds[i] -> (image uint8 (H, W, 3), label uint8 (H, W))`` with labels in
    0..5 (0 = background). Images are rendered on first access; cached ones
    are returned as read-only arrays (copy before changing them in place).
    """

    def __init__(self, split: str = "train", num_images: int | None = None, image_size=64, seed: int = 0,
                 cache_bytes: int = 256 << 20):
        if split not in _SPLIT_IDS:
            raise ValueError(f"ShapesDataset: split must be one of {tuple(_SPLIT_IDS)}, got {split!r}")
        h, w = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        if int(h) != h or int(w) != w or min(h, w) < 16:
            raise ValueError(f"ShapesDataset: image_size must be an int or (H, W) of ints >= 16, got {image_size!r}")
        num_images = _DEFAULT_SIZES[split] if num_images is None else num_images
        if int(num_images) != num_images or num_images < 0:
            raise ValueError(f"ShapesDataset: num_images must be a non-negative int, got {num_images!r}")
        self.split, self.seed = split, int(seed)
        self.image_size = (int(h), int(w))
        self.num_images = int(num_images)
        self.class_names = list(SHAPES_CLASSES)
        self.num_classes = len(SHAPES_CLASSES)
        if int(cache_bytes) != cache_bytes or cache_bytes < 0:
            raise ValueError(f"ShapesDataset: cache_bytes must be a non-negative int, got {cache_bytes!r}")
        self.cache_bytes = int(cache_bytes)
        self._cache = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int):
        if not -self.num_images <= i < self.num_images:
            raise IndexError(f"ShapesDataset: index {i} out of range for {self.num_images} images")
        i = i % self.num_images
        if i in self._cache:
            return self._cache[i]
        rng = np.random.default_rng([self.seed, _SPLIT_IDS[self.split], i])
        image, label = render_shapes(rng, self.image_size)
        size = image.nbytes + label.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            image.flags.writeable = label.flags.writeable = False  # shared by every later access
            self._cache[i] = (image, label)
            self._cached_bytes += size
        return image, label

    def __repr__(self) -> str:
        return (f"ShapesDataset(split={self.split!r}, num_images={self.num_images}, "
                f"image_size={self.image_size}, seed={self.seed})")


def render_shapes(rng: np.random.Generator, size: tuple[int, int]):
    """Draw one image and its label from ``rng``.

    Returns: image uint8 (H, W, 3), label uint8 (H, W).
    """
    h, w = size
    s = min(h, w) / 64.0  # sizes below are in pixels at 64 x 64
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5  # pixel centres
    image = _background(rng, y, x)
    label = np.zeros((h, w), np.uint8)
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, len(SHAPES_CLASSES)))
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        angle = rng.uniform(0, np.pi)
        u, v = _rotate(y - cy, x - cx, angle)
        mask = _SHAPES[cls](rng, u, v, s)
        image[mask] = _object_colour(rng, cls) + rng.normal(0, 4, (int(mask.sum()), 3))
        label[mask] = cls
    return np.clip(image, 0, 255).round().astype(np.uint8), label


def _rotate(dy, dx, angle):
    """Coordinates (u, v) of the offsets (dy, dx) in a frame rotated by ``angle``."""
    c, s = np.cos(angle), np.sin(angle)
    return c * dx + s * dy, -s * dx + c * dy


def _background(rng, y, x):
    """Smooth two-colour gradient, optional faint stripes, pixel noise. float32 (H, W, 3), 0..255."""
    grey = rng.uniform(70, 190, size=2)
    c0, c1 = (g + rng.uniform(-15, 15, 3) for g in grey)  # low saturation
    u, _ = _rotate(y - y.mean(), x - x.mean(), rng.uniform(0, 2 * np.pi))
    t = (u - u.min()) / max(float(np.ptp(u)), 1e-6)
    image = c0 + t[..., None] * (c1 - c0)
    if rng.random() < 0.5:
        period, amplitude = rng.uniform(4, 16), rng.uniform(6, 16)
        su, _ = _rotate(y, x, rng.uniform(0, np.pi))
        image += (amplitude * np.sin(2 * np.pi * su / period))[..., None]
    image += rng.normal(0, rng.uniform(3, 8), image.shape)
    return image.astype(np.float32)


def _object_colour(rng, cls):
    """The class hue (+-10 degrees) at random saturation and brightness. float (3,), 0..255."""
    hue = (_HUES[cls] + rng.uniform(-10, 10)) / 360.0 % 1.0
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 0.95), rng.uniform(0.55, 1.0)))


# Each shape: (rng, u, v, s) -> bool mask (H, W), in the rotated frame (u, v) centred on the object.
def _disc(rng, u, v, s):
    return u * u + v * v <= (rng.uniform(7, 15) * s) ** 2


def _box(rng, u, v, s):
    a, b = rng.uniform(5, 13, size=2) * s
    return (np.abs(u) <= a) & (np.abs(v) <= b)


def _triangle(rng, u, v, s):
    radius = rng.uniform(9, 17) * s
    theta = 2 * np.pi * np.arange(3) / 3 + rng.uniform(-0.3, 0.3, 3)  # keeps the vertices in order
    pu, pv = radius * np.cos(theta), radius * np.sin(theta)
    inside = np.ones(u.shape, bool)
    for k in range(3):  # left of every edge (vertices are counter-clockwise in (u, v))
        a, b = k, (k + 1) % 3
        inside &= (pu[b] - pu[a]) * (v - pv[a]) - (pv[b] - pv[a]) * (u - pu[a]) >= 0
    return inside


def _cross(rng, u, v, s):
    arm, half_width = rng.uniform(10, 18) * s, rng.uniform(2.0, 3.5) * s  # arms 4-7 px wide at 64 px
    return ((np.abs(u) <= arm) & (np.abs(v) <= half_width)) | ((np.abs(v) <= arm) & (np.abs(u) <= half_width))


def _ring(rng, u, v, s):
    outer, thickness = rng.uniform(10, 18) * s, rng.uniform(3.5, 6.0) * s
    r2 = u * u + v * v
    return (r2 <= outer ** 2) & (r2 > (outer - thickness) ** 2)


_SHAPES = {1: _disc, 2: _box, 3: _triangle, 4: _cross, 5: _ring}
