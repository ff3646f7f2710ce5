"""Whole FCNs against the same architecture in PyTorch (optional: skipped without torch).

The PyTorch twin (benchmarks/torch_fcn.py) copies minifcn's weights, so the
two must compute the same logits and the same parameter gradients.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from torch_fcn import TorchFCN, max_relative_difference  # noqa: E402

from minifcn.layers import SoftmaxCrossEntropy  # noqa: E402
from minifcn.models import FCN8s, FCN8sAtOnce, FCN16s, FCN32s  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.mark.parametrize("cls", [FCN32s, FCN16s, FCN8s, FCN8sAtOnce], ids=lambda c: c.__name__)
def test_fcn_matches_pytorch_forward_and_gradients(cls):
    rng = np.random.default_rng(3)
    model = cls(4, 1 / 16, learn_upsampling=True, dropout=0.0, dtype=np.float64)
    for name, p in model.named_parameters():
        if name.startswith("score") or name.endswith("bias"):
            p.data[...] = rng.standard_normal(p.shape) * 0.1
    twin = TorchFCN(model.astype(np.float32)).double()
    model.astype(np.float64)
    for name, p in model.named_parameters():  # TorchFCN copied float32-rounded weights; use them both sides
        p.data[...] = p.data.astype(np.float32)
    x = rng.standard_normal((2, 3, 29, 38))
    labels = rng.integers(0, 4, (2, 29, 38))

    loss = SoftmaxCrossEntropy()
    model.zero_grad()
    logits = model(x)
    value = loss(logits, labels)
    dx = model.backward(loss.backward())

    xt = torch.from_numpy(x).requires_grad_(True)
    out = twin(xt)
    ref = torch.nn.functional.cross_entropy(out, torch.from_numpy(labels))
    ref.backward()

    assert logits.shape == tuple(out.shape) == (2, 4, 29, 38)
    assert max_relative_difference(logits, out.detach().numpy()) < 1e-10
    assert abs(value - ref.item()) < 1e-10 * abs(ref.item())
    assert max_relative_difference(dx, xt.grad.numpy()) < 1e-8
    ours = dict(model.named_parameters())
    for tname, tp in twin.named_parameters():
        if tp.grad is None:
            continue
        # TorchFCN names its modules after minifcn's layers: layers.<name>.weight
        mname = tname.removeprefix("layers.")
        assert max_relative_difference(ours[mname].grad, tp.grad.numpy()) < 1e-8, tname
