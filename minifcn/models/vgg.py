"""The VGG16 backbone as FCN uses it: conv1_1 padded by 100, ceil-mode pools,
fc6/fc7 as convolutions."""
from __future__ import annotations

import numpy as np

from ..layers import Conv2d, Dropout, MaxPool2d, ReLU, he_normal

# (stage, number of 3x3 convolutions, output channels at width 1.0)
VGG16_STAGES = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
FC_CHANNELS = 4096


def scaled(channels: int, width: float) -> int:
    """Channel count at a width multiplier (at least 1)."""
    return max(1, int(round(channels * width)))


def he_init(conv: Conv2d, rng) -> Conv2d:
    """He-normal weights and zero biases, for training a backbone from scratch."""
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    conv.weight.data[...] = he_normal(conv.weight.shape, fan_in, rng, conv.weight.dtype)
    if conv.bias is not None:
        conv.bias.data[...] = 0
    return conv


def vgg16_layers(width: float = 1.0, dropout: float = 0.5, dtype=np.float32, rng=None):
    """The backbone as named stages, ending at drop7.

    Returns a list of five stages, each a list of (name, layer):
    stage 1 to 5 end with pool1..pool5; stage 5 also holds fc6 (7x7, no
    padding), relu6, drop6, fc7 (1x1), relu7, drop7. Convolutions are He-initialised;
    :func:`minifcn.models.weights.load_vgg16_npz` replaces them with ImageNet weights.
    """
    rng = np.random.default_rng(rng)
    stages, in_ch = [], 3
    for stage, n_convs, channels in VGG16_STAGES:
        out_ch = scaled(channels, width)
        layers = []
        for i in range(1, n_convs + 1):
            pad = 100 if (stage, i) == (1, 1) else 1  # pad 100: fc6 is never empty, output covers the input
            layers.append((f"conv{stage}_{i}", he_init(Conv2d(in_ch, out_ch, 3, padding=pad, dtype=dtype), rng)))
            layers.append((f"relu{stage}_{i}", ReLU(inplace=True)))
            in_ch = out_ch
        layers.append((f"pool{stage}", MaxPool2d(2, stride=2, ceil_mode=True)))
        stages.append(layers)
    fc = scaled(FC_CHANNELS, width)
    stages[-1] += [
        ("fc6", he_init(Conv2d(in_ch, fc, 7, dtype=dtype), rng)), ("relu6", ReLU(inplace=True)),
        ("drop6", Dropout(dropout, seed=rng.integers(2**31))),
        ("fc7", he_init(Conv2d(fc, fc, 1, dtype=dtype), rng)), ("relu7", ReLU(inplace=True)),
        ("drop7", Dropout(dropout, seed=rng.integers(2**31))),
    ]
    return stages
