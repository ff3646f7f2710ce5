"""Blob shapes of an FCN from layer geometry alone, without running a convolution.

:func:`fcn_blobs` reads the model's declared wiring (``model.wiring()``, the
one ``forward`` runs) and reports every blob's shape, its inputs, its stride relative to the input (how many input
pixels one step of the blob spans) and the receptive field of one of its
units. The tests check it against real forward passes, and against the
closed-form sizes of the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..layers import Add, Conv2d, ConvTranspose2d, Crop, Dropout, MaxPool2d, ReLU, Scale
from .fcn import FCNBase


@dataclass
class Blob:
    """One intermediate result: shape (C, H, W), stride (input pixels per step,
    < 1 after upsampling), receptive field (input pixels seen by one unit) and
    the blobs it is computed from."""

    name: str
    layer: str
    shape: tuple
    stride: float
    receptive_field: float
    note: str = ""
    inputs: tuple = ()


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
    if not isinstance(model, FCNBase):
        raise TypeError(f"fcn_blobs: unsupported model {type(model).__name__}")
    width = height if width is None else width
    named = {"data": Blob("data", "input", (3, height, width), 1.0, 1.0)}
    for name, *inputs in model.wiring():
        layer, src = getattr(model, name), named[inputs[0]]
        if isinstance(layer, Crop):
            ref, (oy, ox) = named[inputs[1]], layer.offset
            if oy + ref.shape[1] > src.shape[1] or ox + ref.shape[2] > src.shape[2]:
                raise ValueError(f"{name}: offset ({oy}, {ox}) + {ref.shape[1:]} exceeds {src.shape[1:]}")
            blob = Blob(name, "Crop", (src.shape[0],) + tuple(ref.shape[1:]), src.stride, src.receptive_field,
                        f"offset {oy}")
        elif isinstance(layer, Add):
            other = named[inputs[1]]
            blob = Blob(name, "Add", src.shape, src.stride, max(src.receptive_field, other.receptive_field))
        else:
            shape, stride, rf = _apply(layer, src.shape, src.stride, src.receptive_field)
            blob = Blob(name, type(layer).__name__, shape, stride, rf)
        blob.inputs = tuple(inputs)
        named[name] = blob
    return list(named.values())


def fcn_flops(model, height: int, width: int | None = None, batch: int = 1):
    """Forward FLOPs of every convolution and transposed convolution (a multiply-add is 2).

    Returns ``{layer name: flops}`` computed from the real blob shapes of
    :func:`fcn_blobs` (so padding 100 and ceil pooling are counted as they run).
    """
    blobs = fcn_blobs(model, height, width)
    by_name = {b.name: b for b in blobs}
    flops = {}
    for blob in blobs[1:]:
        layer, source = getattr(model, blob.name), by_name[blob.inputs[0]]
        if isinstance(layer, (Conv2d, ConvTranspose2d)):
            (kh, kw), (_, h, w) = layer.kernel_size, (blob if isinstance(layer, Conv2d) else source).shape
            # one multiply-add per output pixel of the convolution C (its input, for a transpose), weight entry
            flops[blob.name] = 2 * batch * layer.in_channels * layer.out_channels * kh * kw * h * w
    return flops
