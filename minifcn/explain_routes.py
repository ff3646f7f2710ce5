"""Which route every layer of an FCN takes, pass by pass, and why: ``minifcn explain routes``.

For every convolution, transposed convolution and max pooling of a model, and
each of its passes (forward, input gradient, weight gradient, bias gradient), the table names
the operation the layer runs (a transposed convolution's forward is its
convolution's input gradient), the route :func:`minifcn.routes.select` picks for
that geometry in the current mode, the route's one-line reason and the FLOPs
(a multiply-add is 2; for pooling, one comparison per window element). The
geometry comes from the model's declared wiring (:func:`minifcn.models.trace.fcn_blobs`)
and each layer's own ``route_facts``, the very facts its ``forward`` and
``backward`` hand to ``select``: a test spies on the route functions during a
training step and finds exactly the routes of this table. Zeroing the gradients
and the SGD update are the last two rows. ReLU, Dropout, Crop and Add have one implementation each.

With ``time=True`` each pass is run by its textbook route and by the route the
fast mode picks, and both medians are reported: a convolution's forward and weight
gradient on the input the layer gets in one forward pass of the model on a random
image (so a data-dependent route such as ``repeated-lines`` meets the runs it finds
in training; its weight gradient is timed with its own search, where a layer reads
its forward's; its input gradient up to runs reads the runs that pass found), everything
else on random arrays. A data-dependent route also names
the route it hands over to where the data offers no shortcut.
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass

import numpy as np

from . import optim, routes  # noqa: F401 (optim registers the SGD update routes)
from .module import ZERO_GRAD
from .backend import get_array_module
from .layers import Conv2d, ConvTranspose2d, MaxPool2d
from .layers.conv_fast import BIAS_GRAD

PASSES = ("forward", "input grad", "weight grad", "bias grad")


@dataclass
class RouteRow:
    """One pass of one layer (or the SGD update): what runs, why, its cost."""

    layer: str
    kind: str            # Conv2d, ConvTranspose2d, MaxPool2d, SGD
    pass_name: str       # forward, input grad, weight grad, bias grad, zero grad, update
    operation: str | None  # None: the pass is not computed (then ``reason`` says why)
    route: str
    reason: str
    input_shape: tuple   # (N, C, H, W) of the layer's input (SGD: (parameter count,))
    flops: int
    textbook_ms: float | None = None
    fast_ms: float | None = None
    hands_over_to: str | None = None  # a data-dependent route: the route that runs where the data offers no shortcut


def _flops(operation, layer, facts):
    if operation == BIAS_GRAD:  # one add per element of dy
        return int(np.prod(facts[0]))
    if operation.startswith("conv_"):
        u, cout = facts[:2]
        return 2 * u.x_shape[0] * cout * u.out_hw[0] * u.out_hw[1] * u.rows
    out = layer.output_shape(facts[0])
    return int(np.prod(out)) * layer.kernel_size[0] * layer.kernel_size[1]


def _median_ms(call, repeats):
    call()  # warm-up: buffers, BLAS threads
    times = []
    for _ in range(repeats):
        start = _time.perf_counter()
        call()
        times.append(_time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _conv_call(operation, route, facts, dtype, rng, x=None, memo=None):
    """A call of ``route.fn`` on random arrays of the geometry ``facts`` (the convolution C's); ``x``, when
    given, is C's input (a layer's input in a forward pass of the model), else random too; ``memo``, when
    given, the layer's from that pass (what an input gradient up to runs reads)."""
    u, cout = facts[:2]
    weight = rng.standard_normal((cout, u.x_shape[1], *u.kernel)).astype(dtype)
    x = rng.standard_normal(u.x_shape).astype(dtype) if x is None else x
    dy = rng.standard_normal((u.x_shape[0], cout, *u.out_hw)).astype(dtype)
    geometry = (u.stride, u.padding, u.dilation)
    if operation == "conv_forward":
        return lambda: route.fn(x, weight, *geometry, u.out_hw)
    if operation == "conv_input_grad":
        extra = {"memo": memo} if route.uses_memo and memo is not None else {}
        return lambda: route.fn(dy, weight, u.x_shape, *geometry, **extra)
    grad = np.zeros(weight.shape, dtype)
    return lambda: route.fn(dy, x, weight.shape, *geometry, accumulate=grad)


def _pool_call(pass_name, layer, x_shape, dtype, rng):
    x = rng.standard_normal(x_shape).astype(dtype)
    if pass_name == "forward":
        return lambda: layer.forward(x)
    dy = rng.standard_normal(layer(x).shape).astype(dtype)
    return lambda: layer.backward(dy)


def _layer_inputs(model, size, batch, dtype, rng):
    """Each Conv2d's (input, memo) in one forward pass of ``model`` on a random image batch: what a
    data-dependent route sees in training (FCN's maps repeat lines outside the image, whatever the image)."""
    model(rng.standard_normal((batch, 3, size, size)).astype(dtype))
    return {name: (layer._cache[0].array, layer._cache[2]) for name, layer in model.named_modules()
            if isinstance(layer, Conv2d) and layer._cache is not None}


def _timings(row, layer, facts, dtype, repeats, rng, x=None, memo=None):
    """(textbook ms, fast ms) of one pass (a convolution's on its input ``x``, or with its ``memo``, when
    given)."""
    if row.kind == "MaxPool2d":
        call = _pool_call(row.pass_name, layer, row.input_shape, dtype, rng)
        out = []
        for name in ("textbook", "fast"):
            with routes.route(name):
                out.append(_median_ms(call, repeats))
        return tuple(out)
    with routes.route("fast"):
        fast = routes.select(row.operation, *facts)
    if row.operation == BIAS_GRAD:
        dy = rng.standard_normal(facts[0]).astype(dtype)
        return tuple(_median_ms(lambda r=r: r.fn(dy), repeats) for r in (routes.textbook(BIAS_GRAD), fast))
    return tuple(_median_ms(_conv_call(row.operation, r, facts, dtype, rng, x, memo), repeats)
                 for r in (routes.textbook(row.operation), fast))


def route_table(model_name="fcn8s", size=128, model_width=0.125, batch=1, num_classes=21, model=None,
                training=True, time=False, repeats=3, seed=0):
    """The routes of every layer and pass of an FCN on a ``batch x 3 x size x size`` input.

    Args:
        model_name, model_width, num_classes: the model to build (or pass ``model``).
        training: as a training step runs it (``model.input_grad = False``: conv1_1
            computes no input gradient); False lists every input gradient.
        time: also measure each pass by its textbook and its fast route (``repeats`` runs, median).
    Returns:
        a list of :class:`RouteRow`, layers in forward order, the SGD update last.
    """
    from .models import build_model  # noqa: PLC0415 (explanations sit above the models)
    from .models.trace import fcn_blobs  # noqa: PLC0415

    if model is None:
        model = build_model(model_name, num_classes=num_classes, width=model_width)
    if training:
        model.input_grad = False
    dtype = model.conv1_1.weight.data.dtype
    rng = np.random.default_rng(seed)
    blobs = fcn_blobs(model, size, size)
    shapes = {b.name: (batch, *b.shape) for b in blobs}
    inputs = _layer_inputs(model, size, batch, dtype, rng) if time else {}
    rows = []
    for blob in blobs[1:]:
        layer = getattr(model, blob.name)
        if not isinstance(layer, (Conv2d, ConvTranspose2d, MaxPool2d)):
            continue
        x_shape = shapes[blob.inputs[0]]
        for pass_name, (operation, facts) in layer.route_facts(x_shape).items():
            if operation is None:
                rows.append(RouteRow(blob.name, type(layer).__name__, pass_name, None, "-", f"not computed: {facts}",
                                     x_shape, 0))
                continue
            chosen = routes.select(operation, *facts)
            reason = chosen.reason if routes.mode() == "fast" else f"textbook mode: {chosen.reason}"
            then = routes.select(operation, *facts, skip=(chosen.name,)).name if chosen.data_dependent else None
            if then:
                reason += f"; where the data offers none: {then}"
            row = RouteRow(blob.name, type(layer).__name__, pass_name, operation, chosen.name, reason, x_shape,
                           _flops(operation, layer, facts), hands_over_to=then)
            if time:
                x, memo = inputs.get(blob.name, (None, None))
                if row.operation not in ("conv_forward", "conv_weight_grad"):
                    x = None
                row.textbook_ms, row.fast_ms = _timings(row, layer, facts, dtype, repeats, rng, x, memo)
            rows.append(row)
    size_all = sum(p.size for _, p in model.named_parameters() if p.trainable)
    chosen = routes.select(ZERO_GRAD)
    rows.append(RouteRow("(all)", "Parameter", "zero grad", ZERO_GRAD, chosen.name, chosen.reason, (size_all,), 0))
    chosen = routes.select(optim.STEP)
    rows.append(RouteRow("(all)", "SGD", "step", optim.STEP, chosen.name, chosen.reason, (size_all,), 0))
    chosen = routes.select("sgd_update", size_all, get_array_module(model.conv1_1.weight.data).__name__)
    rows.append(RouteRow("(all)", "SGD", "update", "sgd_update", chosen.name, chosen.reason, (size_all,),
                         6 * size_all))
    return rows


def format_route_table(rows) -> str:
    """:func:`route_table` rows as aligned text."""
    timed = any(r.textbook_ms is not None for r in rows)
    header = ["layer", "pass", "route", "MFLOP"] + (["textbook ms", "fast ms", "ratio"] if timed else []) + ["reason"]
    table = [header]
    for r in rows:
        cells = [r.layer, r.pass_name, r.route, f"{r.flops / 1e6:.1f}" if r.flops else "-"]
        if timed:
            if r.textbook_ms is None:
                cells += ["-", "-", "-"]
            else:
                cells += [f"{r.textbook_ms:.2f}", f"{r.fast_ms:.2f}", f"{r.textbook_ms / max(r.fast_ms, 1e-9):.2f}"]
        table.append(cells + [r.reason])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
