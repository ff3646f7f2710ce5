"""minifcn.explain_routes: the table of routes is what really runs, and `minifcn explain routes`.

The spy test wraps every registered route function, runs one training step
(forward, loss, backward, SGD) and compares the routes that ran, with the
geometry they ran on, against the table, in the fast and the textbook mode.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from minifcn import route, routes
from minifcn.cli import main
from minifcn.explain_routes import PASSES, format_route_table, route_table
from minifcn.layers import Conv2d, ConvTranspose2d, MaxPool2d, SoftmaxCrossEntropy
from minifcn.layers.conv_fast import conv_facts
from minifcn.models import build_model
from minifcn.models.trace import fcn_flops
from minifcn.optim import SGD

OPERATIONS = ("conv_forward", "conv_input_grad", "conv_weight_grad", "conv_bias_grad", "maxpool_forward",
              "maxpool_input_grad", "sgd_update", "zero_grad")
WHOLE_MODEL = ("sgd_update", "zero_grad", "sgd_step")  # one row for the model (sgd_step: not spied, it
# calls sgd_update, once per parameter on the textbook route and once per group on the packed one)


def _conv_key(u, cout):
    return (u.x_shape, u.kernel, u.stride, u.padding, u.dilation, u.out_hw, cout)


def _call_key(op, args):
    """The geometry of a route call, from its arguments (as the route itself derives it)."""
    if op == "conv_forward":
        x, weight, stride, padding, dilation, *rest = args
        return _conv_key(*conv_facts(x.shape, weight.shape, stride, padding, dilation, rest[0] if rest else None))
    if op == "conv_input_grad":
        dy, weight, x_shape, stride, padding, dilation = args
        return _conv_key(*conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:]))
    if op == "conv_weight_grad":
        dy, x, weight_shape, stride, padding, dilation = args
        return _conv_key(*conv_facts(x.shape, weight_shape, stride, padding, dilation, dy.shape[2:]))
    if op == "conv_bias_grad":
        return tuple(args[0].shape)          # dy
    if op == "maxpool_forward":
        return tuple(args[1].shape)          # y
    if op == "maxpool_input_grad":
        return tuple(args[0].shape)          # dy
    return None                              # SGD and zero_grad: one call per parameter


def _row_key(row, model):
    layer = getattr(model, row.layer)
    _, facts = layer.route_facts(row.input_shape)[row.pass_name]
    if row.operation == "conv_bias_grad":
        return tuple(facts[0])
    if row.operation.startswith("conv_"):
        return _conv_key(*facts[:2])  # (an input gradient's facts also say whether it may be up to runs)
    return tuple(layer.output_shape(row.input_shape))


@pytest.fixture
def spy(monkeypatch):
    """Every route function wrapped: records (operation, route, geometry) of top-level calls."""
    calls, depth = [], [0]
    for op in OPERATIONS:
        for r in routes.routes(op):
            def wrapped(*args, _fn=r.fn, _r=r, **kwargs):
                if depth[0] == 0:
                    calls.append((_r.op, _r.name, _call_key(_r.op, args)))
                depth[0] += 1
                try:
                    return _fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
            monkeypatch.setattr(r, "fn", wrapped)
    return calls


@pytest.mark.parametrize("mode", ["fast", "textbook"])
def test_the_table_names_the_routes_one_training_step_runs(mode, spy):
    size, batch = 64, 2
    model = build_model("fcn8s", num_classes=5, width=0.125, learn_upsampling=True)
    model.upscore_pool4.weight.trainable = False  # one fixed upsampling: its weight gradient is skipped
    with route(mode):
        rows = route_table(model=model, size=size, batch=batch)
        model.input_grad = False  # as training does (route_table set it too)
        optimizer = SGD(model, lr=1e-3, momentum=0.9, weight_decay=5e-4)
        x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
        labels = np.random.default_rng(1).integers(0, 5, (batch, size, size))
        loss = SoftmaxCrossEntropy()
        optimizer.zero_grad()
        loss(model(x), labels)
        model.backward(loss.backward())
        optimizer.step()
    ran = Counter((op, name, key) for op, name, key in spy if op not in WHOLE_MODEL)
    table = Counter((r.operation, r.route, _row_key(r, model)) for r in rows
                    if r.operation is not None and r.operation not in WHOLE_MODEL)
    assert ran == table
    for row, op in zip(rows[-3:], ("zero_grad", "sgd_step", "sgd_update")):
        assert row.operation == op
        if op != "sgd_step":
            assert {name for o, name, _ in spy if o == op} == {row.route}
    assert rows[-2].route == ("per-parameter" if mode == "textbook" else "packed")
    calls = {"zero_grad": len(optimizer.named_params),
             "sgd_update": len(optimizer.named_params) if mode == "textbook" else len(optimizer.groups)}
    assert {op: sum(1 for o, _, _ in spy if o == op) for op in calls} == calls
    names = {r.route for r in rows} | {r.hands_over_to for r in rows if r.hands_over_to}
    if mode == "textbook":
        assert names == {"textbook", "-", "per-parameter"}  # (the textbook SGD step's name)
    else:  # FCN-8s takes every kind of fast route somewhere (or hands over to it where the data has no runs)
        assert {"bands", "shifted", "flipped-kernel", "pointwise", "sub-pixel", "space-to-depth", "pieces",
                "chunked", "padding-core", "repeated-lines", "row-shifted", "lazy", "ones-product", "packed"} <= names
    skipped = {(r.layer, r.pass_name) for r in rows if r.operation is None}
    assert skipped == {("conv1_1", "input grad"), ("upscore_pool4", "weight grad"), ("upscore8", "weight grad"),
                       ("upscore2", "bias grad"), ("upscore_pool4", "bias grad"), ("upscore8", "bias grad")}


@pytest.mark.parametrize("width,size", [(0.125, 128), (1.0, 224)])
def test_every_layer_and_pass_is_listed(width, size, monkeypatch):
    import minifcn.layers.conv as conv_module
    import minifcn.models.vgg as vgg_module

    # the table needs shapes, not weights: zeros build the 134 M parameters of width 1.0 fast
    monkeypatch.setattr(conv_module, "_uniform_init", lambda shape, fan_in, dtype, rng: np.zeros(shape, dtype))
    monkeypatch.setattr(vgg_module, "he_init", lambda conv, rng: conv)
    model = build_model("fcn8s", width=width)
    with route("fast"):
        rows = route_table(model=model, size=size)
    layers = [name for name in dict(model.named_modules()) if isinstance(getattr(model, name, None),
                                                                            (Conv2d, ConvTranspose2d, MaxPool2d))]
    assert len(layers) == 13 + 2 + 3 + 5 + 3  # VGG convs, fc6-7, score layers, pools, upsamplings
    listed = Counter(r.layer for r in rows[:-3])  # (the last three rows: zero grad, the step and the update)
    for name in layers:
        assert listed[name] == (2 if isinstance(getattr(model, name), MaxPool2d) else 4), name
    assert {r.pass_name for r in rows[:-3]} == set(PASSES)
    # forward FLOPs are the model's (trace.fcn_flops, from the same wiring)
    forward = {r.layer: r.flops for r in rows if r.pass_name == "forward" and r.kind != "MaxPool2d"}
    assert forward == fcn_flops(model, size, size)
    text = format_route_table(rows)
    assert "upscore8" in text and "sub-pixel" in text and "not computed: input_grad is off" in text


def test_timed_table_has_both_columns():
    model = build_model("fcn16s", width=1 / 32, num_classes=3)
    rows = route_table(model=model, size=8, time=True, repeats=1)
    timed = [r for r in rows if r.operation is not None and r.kind not in ("SGD", "Parameter")]
    assert timed and all(r.textbook_ms > 0 and r.fast_ms > 0 for r in timed)
    assert "textbook ms" in format_route_table(rows)


def test_timed_table_gives_data_dependent_routes_the_layers_own_inputs(monkeypatch):
    """--time runs a convolution's forward and weight gradient on the input of a real forward pass, so the
    repeated-lines route meets the runs conv1_1's padding leaves (random arrays have none), and its input
    gradient up to runs with the memo of that pass (the runs it found)."""
    import minifcn.explain_routes as explain_routes  # noqa: PLC0415
    from minifcn.layers.line_runs import find_runs  # noqa: PLC0415

    given = {}
    real = explain_routes._conv_call

    def spied(operation, route_, facts, dtype, rng, x=None, memo=None):
        if route_.data_dependent:
            given[(operation, facts[0].x_shape)] = (x, memo)
        return real(operation, route_, facts, dtype, rng, x, memo)

    monkeypatch.setattr(explain_routes, "_conv_call", spied)
    model = build_model("fcn8s", width=0.125, num_classes=3)
    with route("fast"):
        route_table(model=model, size=48, time=True, repeats=1)
    conv1_2 = {op: x for (op, shape), x in given.items() if shape == (1, 8, 246, 246)}  # 48 + 198
    assert sorted(conv1_2) == ["conv_forward", "conv_input_grad", "conv_weight_grad"], given.keys()
    assert all(find_runs(conv1_2[op][0], 2, 7) for op in ("conv_forward", "conv_weight_grad"))
    memo = conv1_2["conv_input_grad"][1]
    assert any(key[0] == "repeated-lines" and plan is not None for key, plan in memo.items()), memo.keys()


def test_cli_explain_routes(capsys, monkeypatch):
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    assert main(["explain", "routes", "--model", "fcn16s", "--size", "48", "--width", "0.0625"]) == 0
    out = capsys.readouterr().out
    assert "upscore16" in out and "route mode 'fast'" in out and "sub-pixel" in out
    monkeypatch.setenv("MINIFCN_ROUTE", "textbook")
    assert main(["explain", "routes", "--model", "fcn16s", "--size", "48", "--width", "0.0625"]) == 0
    out = capsys.readouterr().out
    assert "sub-pixel" not in out and "textbook mode: one product W^T dy, then col2im" in out


def test_cli_names_the_routes_of_conv1_2(capsys, monkeypatch):
    """The README's training model: conv1_2 (8 -> 8 at 328 x 328) looks for runs of identical lines in
    every pass (its input gradient only up to runs: the model's input gradient is off in training), and
    hands over to the shifted products (the flipped kernel) where there are none."""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    assert main(["explain", "routes", "--model", "fcn8s", "--size", "128", "--width", "0.125"]) == 0
    cells = [re.split(r"\s{2,}", line) for line in capsys.readouterr().out.splitlines()]
    conv1_2 = {row[1]: row for row in cells if row[0] == "conv1_2"}  # pass -> cells
    assert {p: row[2] for p, row in conv1_2.items()} == {
        "forward": "repeated-lines", "input grad": "repeated-lines", "weight grad": "repeated-lines",
        "bias grad": "ones-product"}
    for name in ("forward", "weight grad"):
        assert conv1_2[name][-1].endswith("where the data offers none: shifted"), conv1_2[name]
    assert conv1_2["input grad"][-1].endswith("where the data offers none: flipped-kernel")
    assert "exact up to the runs" in conv1_2["input grad"][-1]
