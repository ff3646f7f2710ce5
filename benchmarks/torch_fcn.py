"""The same FCN-32s/16s/8s in PyTorch, for side-by-side timing and output checks.

Optional: imported only by benchmarks and by tests marked ``torch``; never by
``minifcn``. ``TorchFCN.from_minifcn(model)`` copies a minifcn model's weights,
so both compute the same function and their outputs can be compared.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from minifcn.backend import to_numpy
from minifcn.models import FCN8s, FCN16s, FCN32s


class TorchFCN(nn.Module):
    """FCN-32s / 16s / 8s (and at-once) built from a minifcn model's layer list."""

    def __init__(self, model):
        super().__init__()
        self.kind = "8s" if isinstance(model, FCN8s) else "16s" if isinstance(model, FCN16s) else "32s"
        self.scales = getattr(model, "pool_scales", None)
        self.stages = nn.ModuleList()
        for names in model.stages:
            layers = []
            for name in names:
                layer = getattr(model, name)
                kind = type(layer).__name__
                if kind == "Conv2d":
                    layers.append(self._conv(layer))
                elif kind == "ReLU":
                    layers.append(nn.ReLU(inplace=True))
                elif kind == "MaxPool2d":
                    layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
                elif kind == "Dropout":
                    layers.append(nn.Dropout(layer.p))
            self.stages.append(nn.Sequential(*layers))
        self.score_fr = self._conv(model.score_fr)
        if self.kind == "32s":
            self.upscore = self._deconv(model.upscore)
        else:
            self.upscore2 = self._deconv(model.upscore2)
            self.score_pool4 = self._conv(model.score_pool4)
        if self.kind == "16s":
            self.upscore16 = self._deconv(model.upscore16)
        if self.kind == "8s":
            self.upscore_pool4 = self._deconv(model.upscore_pool4)
            self.score_pool3 = self._conv(model.score_pool3)
            self.upscore8 = self._deconv(model.upscore8)

    @staticmethod
    def _conv(layer):
        conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(to_numpy(layer.weight.data)))
            conv.bias.copy_(torch.from_numpy(to_numpy(layer.bias.data)))
        return conv

    @staticmethod
    def _deconv(layer):
        deconv = nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, bias=False)
        with torch.no_grad():
            deconv.weight.copy_(torch.from_numpy(to_numpy(layer.weight.data)))
        deconv.weight.requires_grad_(layer.weight.trainable)
        return deconv

    def forward(self, x):
        h, w = x.shape[2:]
        pool3 = self.stages[2](self.stages[1](self.stages[0](x)))
        pool4 = self.stages[3](pool3)
        score_fr = self.score_fr(self.stages[4](pool4))
        if self.kind == "32s":
            return self.upscore(score_fr)[:, :, 19:19 + h, 19:19 + w]
        up2 = self.upscore2(score_fr)
        p4 = pool4 * self.scales[0] if self.scales else pool4
        sp4 = self.score_pool4(p4)[:, :, 5:5 + up2.shape[2], 5:5 + up2.shape[3]]
        fuse4 = up2 + sp4
        if self.kind == "16s":
            return self.upscore16(fuse4)[:, :, 27:27 + h, 27:27 + w]
        up4 = self.upscore_pool4(fuse4)
        p3 = pool3 * self.scales[1] if self.scales else pool3
        sp3 = self.score_pool3(p3)[:, :, 9:9 + up4.shape[2], 9:9 + up4.shape[3]]
        return self.upscore8(up4 + sp3)[:, :, 31:31 + h, 31:31 + w]


def torch_sgd(model, lr=1e-3, momentum=0.9, weight_decay=5e-4):
    """SGD with the reference's multipliers: biases at 2x learning rate and no decay."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 2 * lr, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


def max_relative_difference(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


__all__ = ["FCN8s", "FCN16s", "FCN32s", "TorchFCN", "max_relative_difference", "torch_sgd"]
