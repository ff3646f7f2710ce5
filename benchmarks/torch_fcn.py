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


class TorchFCN(nn.Module):
    """FCN-32s / 16s / 8s (and at-once) in PyTorch, built from a minifcn model's declared wiring.

    One PyTorch module per minifcn layer, under the same name (so parameter
    names match), and ``forward`` runs ``model.wiring()``: the blobs and their
    inputs are read from the minifcn model, never retyped here.
    """

    def __init__(self, model):
        super().__init__()
        self.wiring = model.wiring()
        self.crops = {}    # Crop name -> offset
        self.scales = {}   # Scale name -> factor
        self.layers = nn.ModuleDict()
        for name, *_ in self.wiring:
            layer = getattr(model, name)
            kind = type(layer).__name__
            if kind == "Crop":
                self.crops[name] = layer.offset
            elif kind == "Scale":
                self.scales[name] = layer.factor
            elif kind != "Add":
                self.layers[name] = self._twin(layer, kind)

    @classmethod
    def _twin(cls, layer, kind):
        if kind == "Conv2d":
            return cls._copy(nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                       layer.padding, layer.dilation, bias=layer.bias is not None), layer)
        if kind == "ConvTranspose2d":
            return cls._copy(nn.ConvTranspose2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                                                layer.padding, layer.output_padding, dilation=layer.dilation,
                                                bias=layer.bias is not None), layer)
        if kind == "ReLU":
            return nn.ReLU(inplace=True)
        if kind == "MaxPool2d":
            return nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding, layer.dilation,
                                ceil_mode=layer.ceil_mode)
        if kind == "Dropout":
            return nn.Dropout(layer.p)
        raise TypeError(f"TorchFCN: no PyTorch twin for {kind}")

    @staticmethod
    def _copy(module, layer):
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(to_numpy(layer.weight.data)))
            if layer.bias is not None:
                module.bias.copy_(torch.from_numpy(to_numpy(layer.bias.data)))
        module.weight.requires_grad_(layer.weight.trainable)
        return module

    def forward(self, x):
        blobs = {"data": x}
        for name, *inputs in self.wiring:
            src = blobs[inputs[0]]
            if name in self.crops:
                (oy, ox), (h, w) = self.crops[name], blobs[inputs[1]].shape[2:]
                blobs[name] = src[:, :, oy:oy + h, ox:ox + w]
            elif name in self.scales:
                blobs[name] = src * self.scales[name]
            elif len(inputs) == 2:  # Add
                blobs[name] = src + blobs[inputs[1]]
            else:
                blobs[name] = self.layers[name](src)
        return blobs["score"]


def torch_sgd(model, lr=1e-3, momentum=0.9, weight_decay=5e-4):
    """SGD with the reference's multipliers: biases at 2x learning rate and no decay."""
    weights = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    return torch.optim.SGD([{"params": weights}, {"params": biases, "lr": 2 * lr, "weight_decay": 0.0}],
                           lr=lr, momentum=momentum, weight_decay=weight_decay)


def max_relative_difference(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


__all__ = ["TorchFCN", "max_relative_difference", "torch_sgd"]
