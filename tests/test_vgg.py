"""The VGG16 backbone as FCN uses it (minifcn/models/vgg.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minifcn.layers import Conv2d, Dropout, MaxPool2d, ReLU
from minifcn.models.vgg import he_init, scaled, vgg16_layers


def test_stages_names_and_geometry():
    stages = vgg16_layers(width=1 / 16, dropout=0.3, rng=0)
    names = [[n for n, _ in stage] for stage in stages]
    convs = (2, 2, 3, 3, 3)
    for s, (stage, n) in enumerate(zip(names, convs), start=1):
        body = [x for i in range(1, n + 1) for x in (f"conv{s}_{i}", f"relu{s}_{i}")] + [f"pool{s}"]
        assert stage[:len(body)] == body
    assert names[4][7:] == ["fc6", "relu6", "drop6", "fc7", "relu7", "drop7"]
    assert all(len(st) == 2 * n + 1 for st, n in zip(names[:4], convs[:4]))
    layers = {n: l for stage in stages for n, l in stage}
    for n, l in layers.items():
        if n.startswith("conv"):
            assert isinstance(l, Conv2d) and l.kernel_size == (3, 3) and l.stride == (1, 1)
            assert l.padding == ((100, 100) if n == "conv1_1" else (1, 1)), n
        elif n.startswith("pool"):
            assert isinstance(l, MaxPool2d) and l.kernel_size == (2, 2) and l.stride == (2, 2) and l.ceil_mode
        elif n.startswith("relu"):
            assert isinstance(l, ReLU)
        elif n.startswith("drop"):
            assert isinstance(l, Dropout) and l.p == 0.3
    assert (layers["fc6"].kernel_size, layers["fc6"].padding) == ((7, 7), (0, 0))
    assert (layers["fc7"].kernel_size, layers["fc7"].padding) == ((1, 1), (0, 0))
    channels = [layers[f"conv{s}_1"].out_channels for s in range(1, 6)]
    assert channels == [4, 8, 16, 32, 32]  # 64, 128, 256, 512, 512 at width 1/16
    assert layers["fc6"].in_channels == 32 and layers["fc6"].out_channels == 256 == layers["fc7"].out_channels


@pytest.mark.parametrize("channels, width, want", [(64, 1.0, 64), (64, 0.125, 8), (512, 1 / 64, 8),
                                                   (64, 1 / 128, 1), (64, 0.001, 1), (4096, 0.0625, 256)])
def test_scaled_channels(channels, width, want):
    assert scaled(channels, width) == want


def test_he_initialisation():
    """Weights ~ N(0, 2 / fan_in), biases 0, for a layer that ReLU follows."""
    conv = he_init(Conv2d(64, 256, 3), np.random.default_rng(0))
    std = math.sqrt(2 / (64 * 9))
    assert abs(conv.weight.data.std() / std - 1) < 0.02
    assert abs(conv.weight.data.mean()) < 0.02 * std * 10
    assert not conv.bias.data.any()
    assert conv.weight.data.dtype == np.float32


def test_same_seed_same_backbone():
    a, b = vgg16_layers(1 / 32, rng=5), vgg16_layers(1 / 32, rng=5)
    c = vgg16_layers(1 / 32, rng=6)
    wa, wb, wc = (dict(st[0] for st in s)["conv1_1"].weight.data for s in (a, b, c))
    np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(wa, wc)
    # the two dropout layers draw different masks
    layers = {n: l for stage in a for n, l in stage}
    assert layers["drop6"].rng.random() != layers["drop7"].rng.random()


def test_dtype_float64():
    layers = {n: l for stage in vgg16_layers(1 / 64, dtype=np.float64) for n, l in stage}
    assert all(l.weight.data.dtype == np.float64 for n, l in layers.items() if isinstance(l, Conv2d))
