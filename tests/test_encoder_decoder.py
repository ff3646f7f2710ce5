"""The small U-shaped encoder-decoder (minifcn/models/encoder_decoder.py): shapes,
skip concatenations, and a whole-model gradient check that can fail."""
from __future__ import annotations

import types

import numpy as np
import pytest

from minifcn.gradcheck import check_layer
from minifcn.layers import Concat
from minifcn.models import EncoderDecoder

# Whole-model tolerance 1e-4 rather than the per-layer 1e-6: finite differences through
# ReLU and max pooling may straddle a kink or a near-tied pooling window (errors up to
# ~1e-3 on unlucky seeds); a wiring bug gives errors of order 1 (see the power test below).
GRAD_TOL = 1e-4


def small_model(seed, num_classes=3):
    """base_width 2, float64, every bias random and nonzero (zero biases leave units on ReLU's kink)."""
    model = EncoderDecoder(num_classes=num_classes, base_width=2, dtype=np.float64, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for n, p in model.named_parameters():
        if n.endswith(".bias"):
            p.data[...] = rng.uniform(0.05, 0.5, p.shape) * rng.choice([-1.0, 1.0], p.shape)
    return model


def small_input(seed, shape=(1, 3, 8, 16)):
    return np.random.default_rng(seed).standard_normal(shape)


def model_gradcheck(model, x, seed, wrt=None):
    return check_layer(model, x, mode="random", eps=1e-6, tol=GRAD_TOL, num_directions=2, seed=seed, wrt=wrt)


@pytest.mark.parametrize("n, c, h, w", [(1, 3, 8, 8), (2, 3, 16, 24), (3, 1, 40, 8)])
def test_output_has_the_input_size(n, c, h, w):
    model = EncoderDecoder(in_channels=c, num_classes=4, base_width=2)
    y = model(np.random.default_rng(0).standard_normal((n, c, h, w)).astype(np.float32))
    assert y.shape == (n, 4, h, w) and y.dtype == np.float32


def test_skips_concatenate_encoder_maps():
    """Each decoder step doubles the size and concatenates the encoder map of that size:
    cat3 sees 4b + 4b channels at H/4, cat2 2b + 2b at H/2, cat1 b + b at H."""
    model = EncoderDecoder(num_classes=2, base_width=3)
    seen = {}
    for name in ("cat1", "cat2", "cat3"):
        real = getattr(model, name).forward
        setattr(getattr(model, name), "forward",
                lambda *a, _n=name, _r=real: seen.setdefault(_n, ([t.shape[1:] for t in a], _r(*a)))[1])
    model(np.zeros((1, 3, 16, 32), np.float32))
    assert seen["cat3"][0] == [(12, 4, 8), (12, 4, 8)]
    assert seen["cat2"][0] == [(6, 8, 16), (6, 8, 16)]
    assert seen["cat1"][0] == [(3, 16, 32), (3, 16, 32)]
    assert all(isinstance(getattr(model, n), Concat) for n in seen)
    assert model.classifier.in_channels == 6 and model.classifier.kernel_size == (1, 1)


@pytest.mark.parametrize("shape", [(1, 3, 12, 8), (1, 3, 8, 20), (3, 8, 8)])
def test_sizes_not_divisible_by_8_are_refused(shape):
    with pytest.raises(ValueError, match=r"divisible by 8.*" + r"\(" + ", ".join(map(str, shape)) + r"\)"):
        EncoderDecoder(base_width=2)(np.zeros(shape, np.float32))


def test_binary_mode_has_one_output_channel():
    model = EncoderDecoder(num_classes=1, base_width=2)
    assert model(np.zeros((2, 3, 8, 8), np.float32)).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.slow)])
def test_gradcheck(seed):
    model = small_model(seed)
    report = model_gradcheck(model, small_input(seed), seed)
    assert {t.name for t in report.tensors} == {n for n, _ in model.named_parameters()} | {"input"}
    assert report.passed, str(report)


def test_gradcheck_catches_a_dropped_concat_skip():
    """Power of the check above: if cat1's backward forgets the encoder map's gradient,
    the first convolution's gradient is wrong by order 1 while the decoder's stays right."""
    model = small_model(0)
    x = small_input(0)
    wrt = ["input", "conv1.weight", "up1.weight"]
    assert model_gradcheck(model, x, 0, wrt).passed

    def forget_encoder_map(self, dy):
        d_up, d_skip = Concat.backward(self, dy)
        return d_up, np.zeros_like(d_skip)

    model.cat1.backward = types.MethodType(forget_encoder_map, model.cat1)  # bound: survives check_layer's deep copy
    report = model_gradcheck(model, x, 0, wrt)
    errors = {t.name: t.max_rel_err for t in report.tensors}
    assert errors["up1.weight"] < GRAD_TOL
    assert not report.passed and errors["conv1.weight"] > 1e-2


def test_batch_gradient_is_the_sum_of_per_image_gradients(batch_gradient_is_the_sum):
    model = small_model(3)
    x = np.concatenate([small_input(4), small_input(5)])
    g = np.random.default_rng(6).standard_normal((2, 3, 8, 16))
    batch_gradient_is_the_sum(model, x, g)
