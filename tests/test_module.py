"""Module, Parameter and Sequential: registration order, modes, state dicts,
and the backward contract (gradients accumulate)."""
from __future__ import annotations

import numpy as np
import pytest

from minifcn import Module, Parameter, Sequential, route, routes
from minifcn.module import ZERO_GRAD
from minifcn.layers import Conv2d, ConvTranspose2d, Dropout, MaxPool2d, ReLU


def small_net(dtype=np.float64):
    return Sequential(
        ("conv1", Conv2d(2, 4, 3, padding=1, dtype=dtype, rng=0)),
        ("relu1", ReLU()),
        ("pool1", MaxPool2d(2, ceil_mode=True)),
        ("drop", Dropout(0.5, seed=0)),
        ("score", Conv2d(4, 3, 1, bias=False, dtype=dtype, rng=1)),
        ("up", ConvTranspose2d(3, 3, 4, stride=2, padding=1, bias=False, dtype=dtype, rng=2)),
    )


class Head(Module):
    """A hand-written module with a parameter of its own and nested children."""

    def __init__(self):
        super().__init__()
        self.scale = Parameter(np.ones(3))
        self.body = Sequential(Conv2d(3, 3, 1, rng=0), ReLU())
        self.fixed = Parameter(np.zeros(2), trainable=False, lr_mult=0.0)


def test_named_parameters_order_and_names():
    net = small_net()
    names = [n for n, _ in net.named_parameters()]
    assert names == ["conv1.weight", "conv1.bias", "score.weight", "up.weight"]
    assert [p for _, p in net.named_parameters()] == net.parameters()
    assert net.parameters()[0] is net.conv1.weight and net.parameters()[3] is net.up.weight
    assert net.num_parameters() == 4 * 2 * 9 + 4 + 3 * 4 + 3 * 3 * 16
    head = Head()
    assert [n for n, _ in head.named_parameters()] == ["scale", "fixed", "body.0.weight", "body.0.bias"]
    assert head.num_parameters(trainable_only=True) == head.num_parameters() - 2
    assert [n for n, _ in head.named_modules()] == ["", "body", "body.0", "body.1"]


def test_reassignment_and_none_parameters():
    conv = Conv2d(1, 1, 3, bias=False)
    assert [n for n, _ in conv.named_parameters()] == ["weight"]
    head = Head()
    head.body = ReLU()  # replaces the Sequential: its parameters disappear
    assert [n for n, _ in head.named_parameters()] == ["scale", "fixed"]
    head.scale = None
    assert [n for n, _ in head.named_parameters()] == ["fixed"]


def test_module_without_super_init_is_a_clear_error():
    class Broken(Module):
        def __init__(self):
            self.w = Parameter(np.zeros(1))

    with pytest.raises(AttributeError, match=r"Broken.__init__ must call super\(\).__init__\(\) first"):
        Broken()


def test_sequential_equals_manual_chaining(rng):
    net = small_net().eval()
    x = rng.standard_normal((2, 2, 5, 6))
    y = net(x)
    h = x
    for layer in net:
        h = layer(h)
    np.testing.assert_array_equal(y, h)
    dy = rng.standard_normal(y.shape)
    net.zero_grad()
    dx = net.backward(dy)
    grads = {n: p.grad.copy() for n, p in net.named_parameters()}
    net.zero_grad()
    g = dy
    for layer in reversed(list(net)):
        g = layer.backward(g)
    np.testing.assert_array_equal(dx, g)
    for n, p in net.named_parameters():
        np.testing.assert_array_equal(p.grad, grads[n])
    assert len(net) == 6 and net[0] is net["conv1"] is net.conv1 and net[-1] is net.up


def test_gradients_accumulate_across_backward_calls(rng):
    net = small_net().eval()
    x = rng.standard_normal((2, 2, 5, 6))
    dy = rng.standard_normal(net(x).shape)
    net.zero_grad()
    net.backward(dy)
    once = [p.grad.copy() for p in net.parameters()]
    assert all(np.abs(g).max() > 0 for g in once)
    net(x)
    net.backward(dy)
    for p, g in zip(net.parameters(), once):
        np.testing.assert_allclose(p.grad, 2 * g, rtol=1e-14)
    net.zero_grad()
    assert all(not p.grad.any() for p in net.parameters())


def test_train_eval_propagate(rng):
    net = Sequential(("a", small_net()), ("b", Sequential(Dropout(0.5, seed=1))))
    assert all(m.training for m in net.modules())
    assert net.eval() is net
    assert not any(m.training for m in net.modules())
    x = rng.standard_normal((1, 3, 4, 4))
    np.testing.assert_array_equal(net.b(x), x)  # Dropout is the identity in eval mode
    net.train()
    assert all(m.training for m in net.modules())
    assert not np.array_equal(net.b(x), x)
    net.b.train(False)
    assert net.training and net.a.training and not net.b[0].training


def test_state_dict_round_trip(rng):
    a, b = small_net(), small_net()
    for p in b.parameters():
        p.data[...] = rng.standard_normal(p.shape)
    state = a.state_dict()
    assert list(state) == [n for n, _ in a.named_parameters()]
    assert state["conv1.weight"] is a.conv1.weight.data  # not a copy
    x = rng.standard_normal((1, 2, 6, 6))
    a.eval(), b.eval()
    assert not np.allclose(a(x), b(x))
    missing, unexpected = b.load_state_dict({k: v.copy() for k, v in state.items()})
    assert missing == [] and unexpected == []
    np.testing.assert_array_equal(a(x), b(x))
    # Loading float64 arrays into a float32 model keeps it float32.
    c = small_net(np.float32)
    c.load_state_dict(state)
    assert all(p.dtype == np.float32 for p in c.parameters())
    np.testing.assert_allclose(c.conv1.weight.data, state["conv1.weight"], rtol=1e-6)


def test_state_dict_errors():
    net = small_net()
    state = dict(net.state_dict())
    with pytest.raises(ValueError, match=r"parameter 'score.weight': expected shape \(3, 4, 1, 1\), got \(3, 4, 2, 2\)"):
        net.load_state_dict({**state, "score.weight": np.zeros((3, 4, 2, 2))})
    partial = {k: v for k, v in state.items() if k != "conv1.bias"}
    with pytest.raises(KeyError, match=r"missing \['conv1.bias'\]"):
        net.load_state_dict(partial)
    with pytest.raises(KeyError, match=r"unexpected \['extra.weight'\]"):
        net.load_state_dict({**state, "extra.weight": np.zeros(1)})
    before = net.conv1.bias.data.copy()
    missing, unexpected = net.load_state_dict({**partial, "extra.weight": np.zeros(1)}, strict=False)
    assert missing == ["conv1.bias"] and unexpected == ["extra.weight"]
    np.testing.assert_array_equal(net.conv1.bias.data, before)


def test_astype_recreates_gradients():
    net = small_net(np.float32)
    net.astype(np.float64)
    for p in net.parameters():
        assert p.data.dtype == p.grad.dtype == np.float64 and p.grad.shape == p.data.shape
    assert "conv1" in repr(net) and "Conv2d(2, 4" in repr(net)


def test_parameter_basics():
    p = Parameter(np.ones((2, 3), np.float32), lr_mult=2, decay_mult=0)
    assert p.shape == (2, 3) and p.dtype == np.float32 and p.size == 6
    assert p.grad.dtype == np.float32 and not p.grad.any()
    assert p.trainable and p.lr_mult == 2.0 and p.decay_mult == 0.0
    p.grad += 1
    p.zero_grad()
    assert not p.grad.any()
    assert "shape=(2, 3)" in repr(p) and "fixed" in repr(Parameter(np.zeros(1), trainable=False))


def test_lazy_zero_grad_reads_as_zeros_and_lets_the_first_pass_store():
    p = Parameter(np.ones((2, 3)))
    p.grad[...] = 7.0
    with route("fast"):
        assert routes.select(ZERO_GRAD).name == "lazy"
        p.zero_grad()
    assert (p._grad == 7.0).all()                # nothing written yet: the stale numbers are still there
    grad, overwrite = p.grad_for_backward()
    assert grad is p._grad and overwrite         # the first pass stores its contribution ...
    assert p.grad_for_backward()[1] is False     # ... and every later one adds
    with route("fast"):
        p.zero_grad()
    assert not p.grad.any()                      # a reader before any pass gets the zeros, written then
    assert p.grad_for_backward()[1] is False     # and the next pass adds into them
    p.grad = np.full((2, 3), 5.0)                # an assigned array is the gradient as it is
    assert (p.grad == 5.0).all() and p.grad_for_backward()[1] is False


def test_textbook_zero_grad_writes_the_zeros_at_once():
    p = Parameter(np.ones(4))
    p.grad[...] = 3.0
    with route("textbook"):
        assert routes.select(ZERO_GRAD).name == "textbook"
        p.zero_grad()
    assert not p._grad.any() and p.grad_for_backward()[1] is False


@pytest.mark.parametrize("backwards", [1, 2])
def test_lazy_and_textbook_zero_grad_give_the_same_gradients(backwards, rng):
    """Stale gradients (NaN) zeroed either way, then one or two backward passes: the same numbers."""
    net = small_net().eval()
    x = rng.standard_normal((2, 2, 5, 6))
    dy = rng.standard_normal(net(x).shape)
    got = {}
    for zero in ("textbook", "lazy"):
        for p in net.parameters():
            p.grad[...] = np.nan
            routes.routes(ZERO_GRAD)[-1 if zero == "textbook" else 0].fn(p)
        with route("fast"):  # the same convolution routes both times
            for _ in range(backwards):
                net(x)
                net.backward(dy)
        got[zero] = [p.grad.copy() for p in net.parameters()]
    for lazy, eager in zip(got["lazy"], got["textbook"]):
        np.testing.assert_array_equal(lazy, eager)
