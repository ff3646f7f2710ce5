"""FCN-32s, FCN-16s, FCN-8s and FCN-8s at-once (Long, Shelhamer and Darrell, CVPR 2015).

Each model declares its wiring once, as the reference ``net.py`` does: every
blob (named after the layer that computes it) with the blobs it is computed
from (:meth:`FCNBase.wiring`). ``forward`` runs that declaration; the blob
table and FLOPs (:mod:`minifcn.models.trace`), ``minifcn explain`` and the
PyTorch twin of the benchmarks read it too. ``backward`` is written out by
hand, the wiring in reverse: it is the lesson. Sizes for an input side H
(F = ceil((H + 6) / 32) is the side of fc6 and score_fr):

=============  ======================  =============  ===========
model          upsampling              before crop    crop offset
=============  ======================  =============  ===========
FCN-32s        upscore 64/32           32F + 32       19
FCN-16s        upscore2 4/2,           32F + 48       27 (pool4: 5)
               upscore16 32/16
FCN-8s         upscore2, upscore_pool4 32F + 56       31 (pool4: 5,
               4/2, upscore8 16/8                     pool3: 9)
=============  ======================  =============  ===========
"""
from __future__ import annotations

import numpy as np

from ..layers import Add, Conv2d, ConvTranspose2d, Crop, Scale, bilinear_kernel
from ..backend import get_array_module
from ..module import Module, input_grad_switch
from .vgg import scaled, vgg16_layers


def score_layer(in_channels, num_classes, dtype):
    """A zero-initialised 1x1 classifier (score_fr, score_pool4, score_pool3)."""
    conv = Conv2d(in_channels, num_classes, 1, dtype=dtype)
    conv.weight.data[...] = 0
    conv.bias.data[...] = 0
    return conv


def bilinear_upsampler(num_classes, factor, learnable, dtype):
    """ConvTranspose2d(kernel 2*factor, stride factor, no bias), bilinear-initialised.

    Fixed (``trainable=False``) unless ``learnable``: the reference code freezes it,
    the CVPR paper learned the 2x ones.
    """
    up = ConvTranspose2d(num_classes, num_classes, 2 * factor, stride=factor, bias=False, dtype=dtype)
    up.weight.data[...] = bilinear_kernel(num_classes, num_classes, 2 * factor, dtype)
    up.weight.trainable = bool(learnable)
    return up


class FCNBase(Module):
    """The shared VGG16 trunk and helpers; subclasses add a head and its wiring.

    Args:
        num_classes: output channels (21 for Pascal VOC).
        width: multiplies every backbone and fc6/fc7 channel count (0.125 for a
            small CPU model; 1.0 is the paper's network).
        learn_upsampling: learn the 2x transposed convolutions (CVPR recipe)
            instead of keeping every upsampling fixed bilinear (reference code).
        dropout: drop6/drop7 probability (0.5 in the reference).
        dtype: float32 (default) or float64; seed: initial weights.

    Input (N, 3, H, W) of any size; output logits (N, num_classes, H, W).
    Biases get the reference's 2x learning rate and no weight decay.
    """

    def __init__(self, num_classes=21, width=1.0, learn_upsampling=False, dropout=0.5, dtype=np.float32, seed=0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.num_classes, self.width, self.learn_upsampling = int(num_classes), float(width), bool(learn_upsampling)
        self.dtype = np.dtype(dtype)
        self.stages = []  # names of the layers of stage 1..5 (stage 5 ends at drop7)
        for stage in vgg16_layers(width, dropout, dtype, seed):
            for name, layer in stage:
                setattr(self, name, layer)
            self.stages.append([name for name, _ in stage])
        self.fc_channels = self.fc7.out_channels

    def finish_init(self):
        """Reference multipliers: biases learn at 2x and take no weight decay."""
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                p.lr_mult, p.decay_mult = 2.0, 0.0
        return self

    def wiring(self):
        """Every blob in forward order with its inputs: ``[(name, input, ...), ...]``; ``data`` is the image.

        The backbone is a chain (conv1_1 ... drop7); :meth:`head` is each model's own.
        """
        chain = [name for stage in self.stages for name in stage]
        return [(name, source) for source, name in zip(["data"] + chain, chain)] + self.head()

    def head(self):
        """The blobs after the backbone with their inputs (Crop: source, reference; Add: both terms)."""
        raise NotImplementedError

    def forward_blobs(self, x, keep=True, zero=(), given=None):
        """Run :meth:`wiring` on x: ``{blob name: array}`` (only ``score`` unless ``keep``).

        For the explanations: blobs named in ``zero`` are replaced by zeros once
        computed; with ``given`` (the blobs of an earlier run on the same x) only
        the blobs downstream of ``zero`` are computed again. ReLUs work in
        place, so a kept convolution blob holds its ReLU's output.
        """
        wiring = self.wiring()
        last_use = {source: step for step, (_, *inputs) in enumerate(wiring) for source in inputs}
        blobs, changed = {"data": x}, set(zero)
        for step, (name, *inputs) in enumerate(wiring):
            if given is not None and name not in changed and not changed.intersection(inputs):
                blobs[name] = given[name]
            else:
                blobs[name] = getattr(self, name)(*(blobs[source] for source in inputs))
                if name in zero:
                    blobs[name] = get_array_module(x).zeros_like(blobs[name])
                changed.add(name)
            if not keep:
                for source in inputs:
                    if last_use[source] == step and source != "data":
                        del blobs[source]
        return blobs

    def forward(self, x):
        self.check_input(x)
        return self.forward_blobs(x, keep=False)["score"]

    def run_backward(self, stages, dy):
        """Backward through the same stages in reverse order."""
        for s in reversed(stages):
            for name in reversed(self.stages[s - 1]):
                dy = getattr(self, name).backward(dy)
        return dy

    input_grad = input_grad_switch("conv1_1", up_to_runs=True)  # the padding of 100 repeats lines

    def check_input(self, x):
        if getattr(x, "ndim", None) != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__}: expected images of shape (N, 3, H, W), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.dtype != self.conv1_1.weight.data.dtype:
            raise ValueError(f"{type(self).__name__}: input dtype {x.dtype} does not match the model's "
                             f"{self.conv1_1.weight.data.dtype}")

    def extra_repr(self):
        return f"num_classes={self.num_classes}, width={self.width}, learn_upsampling={self.learn_upsampling}"


class FCN32s(FCNBase):
    """FCN-32s: score_fr upsampled 32x in one step (upscore 64/32), cropped at 19."""

    def __init__(self, num_classes=21, width=1.0, learn_upsampling=False, dropout=0.5, dtype=np.float32, seed=0):
        super().__init__(num_classes, width, learn_upsampling, dropout, dtype, seed)
        self.score_fr = score_layer(self.fc_channels, num_classes, dtype)
        self.upscore = bilinear_upsampler(num_classes, 32, False, dtype)
        self.score = Crop(19)
        self.finish_init()

    def head(self):
        return [("score_fr", "drop7"),
                ("upscore", "score_fr"),
                ("score", "upscore", "data")]

    def backward(self, dy):
        d = self.upscore.backward(self.score.backward(dy))
        return self.run_backward([1, 2, 3, 4, 5], self.score_fr.backward(d))


class FCN16s(FCNBase):
    """FCN-16s: 2x-upsampled score_fr + score of pool4 (cropped at 5), then 16x (32/16), crop 27."""

    pool4_scale = None

    def __init__(self, num_classes=21, width=1.0, learn_upsampling=False, dropout=0.5, dtype=np.float32, seed=0):
        super().__init__(num_classes, width, learn_upsampling, dropout, dtype, seed)
        self.score_fr = score_layer(self.fc_channels, num_classes, dtype)
        self.upscore2 = bilinear_upsampler(num_classes, 2, learn_upsampling, dtype)
        self.score_pool4 = score_layer(scaled(512, width), num_classes, dtype)
        self.score_pool4c = Crop(5)
        self.fuse_pool4 = Add()
        self.upscore16 = bilinear_upsampler(num_classes, 16, False, dtype)
        self.score = Crop(27)
        self.finish_init()

    def head(self):
        return [("score_fr", "drop7"),
                ("upscore2", "score_fr"),
                ("score_pool4", "pool4"),
                ("score_pool4c", "score_pool4", "upscore2"),      # Crop(score_pool4, like upscore2)
                ("fuse_pool4", "upscore2", "score_pool4c"),
                ("upscore16", "fuse_pool4"),
                ("score", "upscore16", "data")]

    def backward(self, dy):
        d_fuse = self.upscore16.backward(self.score.backward(dy))
        d_upscore2, d_score_pool4c = self.fuse_pool4.backward(d_fuse)
        d_pool4 = self.score_pool4.backward(self.score_pool4c.backward(d_score_pool4c))
        d_pool4 = d_pool4 + self.run_backward([5], self.score_fr.backward(self.upscore2.backward(d_upscore2)))
        return self.run_backward([1, 2, 3, 4], d_pool4)


class FCN8s(FCNBase):
    """FCN-8s: FCN-16s's fusion, 2x again, + score of pool3 (cropped at 9), then 8x (16/8), crop 31.

    ``FCN8sAtOnce`` also scales pool4 by 0.01 and pool3 by 0.0001 before their
    score layers, so that all three streams can be trained together from the start.
    """

    pool_scales = None  # (pool4, pool3) multipliers of the at-once variant

    def __init__(self, num_classes=21, width=1.0, learn_upsampling=False, dropout=0.5, dtype=np.float32, seed=0):
        super().__init__(num_classes, width, learn_upsampling, dropout, dtype, seed)
        self.score_fr = score_layer(self.fc_channels, num_classes, dtype)
        self.upscore2 = bilinear_upsampler(num_classes, 2, learn_upsampling, dtype)
        if self.pool_scales:
            self.scale_pool4 = Scale(self.pool_scales[0])
        self.score_pool4 = score_layer(scaled(512, width), num_classes, dtype)
        self.score_pool4c = Crop(5)
        self.fuse_pool4 = Add()
        self.upscore_pool4 = bilinear_upsampler(num_classes, 2, learn_upsampling, dtype)
        if self.pool_scales:
            self.scale_pool3 = Scale(self.pool_scales[1])
        self.score_pool3 = score_layer(scaled(256, width), num_classes, dtype)
        self.score_pool3c = Crop(9)
        self.fuse_pool3 = Add()
        self.upscore8 = bilinear_upsampler(num_classes, 8, False, dtype)
        self.score = Crop(31)
        self.finish_init()

    def _scaled_backward(self, name, d):
        return getattr(self, name).backward(d) if self.pool_scales else d

    def head(self):
        at_once = bool(self.pool_scales)  # pool4 and pool3 pass through scale_pool4 / scale_pool3 first
        return [("score_fr", "drop7"),
                ("upscore2", "score_fr"),
                *([("scale_pool4", "pool4")] if at_once else []),
                ("score_pool4", "scale_pool4" if at_once else "pool4"),
                ("score_pool4c", "score_pool4", "upscore2"),
                ("fuse_pool4", "upscore2", "score_pool4c"),
                ("upscore_pool4", "fuse_pool4"),
                *([("scale_pool3", "pool3")] if at_once else []),
                ("score_pool3", "scale_pool3" if at_once else "pool3"),
                ("score_pool3c", "score_pool3", "upscore_pool4"),
                ("fuse_pool3", "upscore_pool4", "score_pool3c"),
                ("upscore8", "fuse_pool3"),
                ("score", "upscore8", "data")]

    def backward(self, dy):
        d_fuse3 = self.upscore8.backward(self.score.backward(dy))
        d_upscore_pool4, d_score_pool3c = self.fuse_pool3.backward(d_fuse3)
        d_pool3 = self._scaled_backward("scale_pool3", self.score_pool3.backward(self.score_pool3c.backward(d_score_pool3c)))
        d_fuse4 = self.upscore_pool4.backward(d_upscore_pool4)
        d_upscore2, d_score_pool4c = self.fuse_pool4.backward(d_fuse4)
        d_pool4 = self._scaled_backward("scale_pool4", self.score_pool4.backward(self.score_pool4c.backward(d_score_pool4c)))
        d_pool4 = d_pool4 + self.run_backward([5], self.score_fr.backward(self.upscore2.backward(d_upscore2)))
        d_pool3 = d_pool3 + self.run_backward([4], d_pool4)
        return self.run_backward([1, 2, 3], d_pool3)


class FCN8sAtOnce(FCN8s):
    """FCN-8s trained in one stage: pool4 scaled by 0.01 and pool3 by 0.0001 (fixed)."""

    pool_scales = (0.01, 0.0001)


MODELS = {"fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s, "fcn8s-atonce": FCN8sAtOnce}
