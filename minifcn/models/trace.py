"""Blob shapes of an FCN from layer geometry alone, without running a convolution.

:func:`fcn_blobs` follows the same wiring as the models' ``forward`` and
reports every blob's shape, its stride relative to the input (how many input
pixels one step of the blob spans) and the receptive field of one of its
units. The tests check it against real forward passes, and against the
closed-form sizes of the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import Conv2d, ConvTranspose2d, Crop, Dropout, MaxPool2d, ReLU, Scale
from .fcn import FCN8s, FCN16s, FCN32s


@dataclass
class Blob:
    """One intermediate result: shape (C, H, W), stride (input pixels per step,
    < 1 after upsampling) and receptive field (input pixels seen by one unit)."""

    name: str
    layer: str
    shape: tuple
    stride: float
    receptive_field: float
    note: str = ""


def _apply(layer, shape, stride, rf):
    """Shape, stride and receptive field after one layer (height axis; FCN is square-symmetric)."""
    n = (1,) + tuple(shape)
    if isinstance(layer, (Conv2d, MaxPool2d)):
        out = layer.output_shape(n)[1:]
        k, s = layer.kernel_size[0], layer.stride[0]
        d = layer.dilation[0]
        return out, stride * s, rf + (d * (k - 1)) * stride
    if isinstance(layer, ConvTranspose2d):
        out = layer.output_shape(n)[1:]
        k, s = layer.kernel_size[0], layer.stride[0]
        # each output unit sees ceil(k / s) input units of the previous blob
        return out, stride / s, rf + (-(-k // s) - 1) * stride
    if isinstance(layer, (ReLU, Dropout, Scale)):
        return tuple(shape), stride, rf
    raise TypeError(f"no shape rule for {type(layer).__name__}")


def fcn_blobs(model, height: int, width: int | None = None):
    """The list of :class:`Blob` of an FCN-32s/16s/8s (or at-once) for an input of ``height x width``."""
    if not isinstance(model, (FCN32s, FCN16s, FCN8s)):
        raise TypeError(f"fcn_blobs: unsupported model {type(model).__name__}")
    width = height if width is None else width
    data = Blob("data", "input", (3, height, width), 1.0, 1.0)
    blobs, named = [data], {}

    def add(blob):
        blobs.append(blob)
        named[blob.name] = blob
        return blob

    def step(name, src):
        layer = getattr(model, name)
        shape, stride, rf = _apply(layer, src.shape, src.stride, src.receptive_field)
        return add(Blob(name, type(layer).__name__, shape, stride, rf))

    def crop(name, src, ref):
        oy, ox = getattr(model, name).offset
        if oy + ref.shape[1] > src.shape[1] or ox + ref.shape[2] > src.shape[2]:
            raise ValueError(f"{name}: offset ({oy}, {ox}) + {ref.shape[1:]} exceeds {src.shape[1:]}")
        return add(Blob(name, "Crop", (src.shape[0],) + tuple(ref.shape[1:]), src.stride, src.receptive_field,
                        f"offset {oy}"))

    def fuse(name, a, b):
        return add(Blob(name, "Add", a.shape, a.stride, max(a.receptive_field, b.receptive_field)))

    def scaled(pool, scale_name):
        return step(scale_name, pool) if getattr(model, "pool_scales", None) else pool

    cur = data
    for names in model.stages:                 # conv1_1 ... pool5, fc6 ... drop7
        for name in names:
            cur = step(name, cur)
    score_fr = step("score_fr", cur)
    if isinstance(model, FCN32s):
        crop("score", step("upscore", score_fr), data)
        return blobs
    upscore2 = step("upscore2", score_fr)
    score_pool4c = crop("score_pool4c", step("score_pool4", scaled(named["pool4"], "scale_pool4")), upscore2)
    fuse_pool4 = fuse("fuse_pool4", upscore2, score_pool4c)
    if isinstance(model, FCN16s):
        crop("score", step("upscore16", fuse_pool4), data)
        return blobs
    upscore_pool4 = step("upscore_pool4", fuse_pool4)
    score_pool3c = crop("score_pool3c", step("score_pool3", scaled(named["pool3"], "scale_pool3")), upscore_pool4)
    fuse_pool3 = fuse("fuse_pool3", upscore_pool4, score_pool3c)
    crop("score", step("upscore8", fuse_pool3), data)
    return blobs


def fcn_flops(model, height: int, width: int | None = None, batch: int = 1):
    """Forward FLOPs of every convolution and transposed convolution (a multiply-add is 2).

    Returns ``{layer name: flops}`` computed from the real blob shapes of
    :func:`fcn_blobs` (so padding 100 and ceil pooling are counted as they run).
    """
    blobs = fcn_blobs(model, height, width)
    flops, previous = {}, blobs[0]
    by_name = {b.name: b for b in blobs}
    inputs = {"score_pool4": "scale_pool4" if "scale_pool4" in by_name else "pool4",
              "score_pool3": "scale_pool3" if "scale_pool3" in by_name else "pool3",
              "upscore2": "score_fr", "upscore": "score_fr", "upscore16": "fuse_pool4",
              "upscore_pool4": "fuse_pool4", "upscore8": "fuse_pool3"}
    for blob in blobs[1:]:
        source = by_name[inputs[blob.name]] if blob.name in inputs else previous
        layer = getattr(model, blob.name, None)
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            flops[blob.name] = 2 * batch * layer.out_channels * blob.shape[1] * blob.shape[2] * layer.in_channels * kh * kw
        elif isinstance(layer, ConvTranspose2d):
            kh, kw = layer.kernel_size
            flops[blob.name] = 2 * batch * layer.in_channels * source.shape[1] * source.shape[2] * layer.out_channels * kh * kw
        previous = blob
    return flops
