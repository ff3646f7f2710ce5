"""A small U-shaped encoder-decoder: three conv + max-pool stages, three
transposed convolutions that double the size, each concatenated with the
encoder feature map of that size, and a 1x1 classifier."""
from __future__ import annotations

import numpy as np

from ..layers import Concat, Conv2d, ConvTranspose2d, MaxPool2d, ReLU
from ..module import Module, input_grad_switch
from .vgg import he_init


class EncoderDecoder(Module):
    """Encoder-decoder for binary masks (``num_classes=1``: use
    SigmoidBinaryCrossEntropy) or several classes (softmax cross-entropy).

    Encoder stage k (k = 1, 2, 3): ``conv{k}`` 3x3 pad 1 + ReLU (kept as the skip
    ``e{k}``), then ``pool{k}`` 2x2. Bottleneck ``conv4`` 3x3 + ReLU at H/8.
    Decoder step k: ``up{k}`` ConvTranspose2d(kernel 3, stride 2, padding 1,
    output_padding 1) doubles the size, ReLU, then ``cat{k}`` concatenates the
    encoder map of that size. ``classifier``: 1x1 convolution.

    Input (N, in_channels, H, W) with H and W divisible by 8; output
    (N, num_classes, H, W).
    """

    input_grad = input_grad_switch("conv1")

    def __init__(self, in_channels=3, num_classes=1, base_width=16, dtype=np.float32, seed=0):
        super().__init__()
        rng = np.random.default_rng(seed)
        c1, c2, c3, c4 = base_width, 2 * base_width, 4 * base_width, 8 * base_width
        self.num_classes = int(num_classes)
        self.conv1, self.relu1, self.pool1 = he_init(Conv2d(in_channels, c1, 3, padding=1, dtype=dtype), rng), ReLU(), MaxPool2d(2)
        self.conv2, self.relu2, self.pool2 = he_init(Conv2d(c1, c2, 3, padding=1, dtype=dtype), rng), ReLU(), MaxPool2d(2)
        self.conv3, self.relu3, self.pool3 = he_init(Conv2d(c2, c3, 3, padding=1, dtype=dtype), rng), ReLU(), MaxPool2d(2)
        self.conv4, self.relu4 = he_init(Conv2d(c3, c4, 3, padding=1, dtype=dtype), rng), ReLU()

        def up(cin, cout):
            return ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1, dtype=dtype, rng=rng)

        self.up3, self.uprelu3, self.cat3 = up(c4, c3), ReLU(), Concat()     # H/8 -> H/4, + e3
        self.up2, self.uprelu2, self.cat2 = up(2 * c3, c2), ReLU(), Concat()  # H/4 -> H/2, + e2
        self.up1, self.uprelu1, self.cat1 = up(2 * c2, c1), ReLU(), Concat()  # H/2 -> H,   + e1
        self.classifier = Conv2d(2 * c1, num_classes, 1, dtype=dtype, rng=rng)

    def forward(self, x):
        if getattr(x, "ndim", None) != 4 or x.shape[2] % 8 or x.shape[3] % 8:
            raise ValueError(f"EncoderDecoder: expected (N, C, H, W) with H and W divisible by 8, got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        e1 = self.relu1(self.conv1(x))
        e2 = self.relu2(self.conv2(self.pool1(e1)))
        e3 = self.relu3(self.conv3(self.pool2(e2)))
        h = self.relu4(self.conv4(self.pool3(e3)))
        h = self.cat3(self.uprelu3(self.up3(h)), e3)
        h = self.cat2(self.uprelu2(self.up2(h)), e2)
        h = self.cat1(self.uprelu1(self.up1(h)), e1)
        return self.classifier(h)

    def backward(self, dy):
        d_h, d_e1 = self.cat1.backward(self.classifier.backward(dy))
        d_h, d_e2 = self.cat2.backward(self.up1.backward(self.uprelu1.backward(d_h)))
        d_h, d_e3 = self.cat3.backward(self.up2.backward(self.uprelu2.backward(d_h)))
        d_h = self.pool3.backward(self.conv4.backward(self.relu4.backward(self.up3.backward(self.uprelu3.backward(d_h)))))
        d_e2 = d_e2 + self.pool2.backward(self.conv3.backward(self.relu3.backward(d_e3 + d_h)))
        d_e1 = d_e1 + self.pool1.backward(self.conv2.backward(self.relu2.backward(d_e2)))
        return self.conv1.backward(self.relu1.backward(d_e1))
