"""The fast convolution routes against the textbook ones, on random geometries, in float64.

For each of Conv2d and ConvTranspose2d, 72 random geometries (biased towards
the cases the fast routes exist for: 1x1, stride 1, stride dividing the
kernel, stride 1 with 4 to 8 channels, 3x3 at stride 1; half of them with runs
of repeated rows and columns in the input, for the ``repeated-lines`` routes), each with forward, input gradient and weight gradient computed under
``route("textbook")`` and ``route("fast")``: they agree to 1e-10 relative.
Every fast route is exercised, and each fast route function called on its own
agrees with the textbook function wherever its rule applies.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from minifcn import route, routes
from minifcn.layers import Conv2d, ConvTranspose2d, columns, conv_fast
from minifcn.layers.conv_fast import FORWARD, INPUT_GRAD, WEIGHT_GRAD

SWEEP = 72
TOL = 1e-10


def random_geometry(rng):
    """kernel, stride, padding, dilation (pairs), batch, channels in/out, input side of the convolution C."""
    kind = rng.choice(["pointwise", "stride1", "blocked", "any", "shifted", "padded", "winograd"])
    if kind == "winograd":  # the ``winograd`` routes' geometry: 3x3, stride 1, no dilation, odd and even sides
        p = tuple(int(v) for v in rng.integers(0, 3, 2))
        hw = tuple(int(max(1, 3 - 2 * pp) + rng.integers(0, 12)) for pp in p)
        return (3, 3), (1, 1), p, (1, 1), int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), hw
    if kind == "padded":  # padding past the kernel's reach on some side (conv1_1's 100): the ``padding-core`` routes
        k = tuple(int(v) for v in rng.integers(1, 5, 2))
        s, d = tuple(int(v) for v in rng.integers(1, 4, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(dd * (kk - 1) + rng.integers(0, 7)) for kk, dd in zip(k, d))
        hw = tuple(int(v) for v in rng.integers(1, 9, 2))
        return k, s, p, d, int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6)), hw
    if kind == "shifted":  # the ``shifted`` routes' geometry: stride 1, 4 to 8 channels (conv1_2 has 8 -> 8)
        k = (int(rng.integers(2, 6)), int(rng.integers(1, 6)))[::int(rng.choice([1, -1]))]
        s, d = (1, 1), tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(rng.integers(0, kk * dd // 2 + 1)) for kk, dd in zip(k, d))
        span = [dd * (kk - 1) + 1 for kk, dd in zip(k, d)]
        hw = tuple(int(max(1, sp - 2 * pp) + rng.integers(0, 14)) for sp, pp in zip(span, p))
        return k, s, p, d, int(rng.integers(1, 4)), int(rng.integers(4, 9)), int(rng.integers(1, 9)), hw
    if kind == "pointwise":
        k, s, p, d = (1, 1), (1, 1), (0, 0), (1, 1)
    elif kind == "stride1":
        k = tuple(int(v) for v in rng.integers(1, 6, 2))
        s, d = (1, 1), tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(rng.integers(0, kk * dd // 2 + 1)) for kk, dd in zip(k, d))
    elif kind == "blocked":
        s = tuple(int(v) for v in rng.integers(2, 5, 2))
        k = tuple(int(ss * rng.integers(1, 4)) for ss in s)
        p, d = tuple(int(rng.integers(0, kk // 2 + 1)) for kk in k), (1, 1)
    else:
        k = tuple(int(v) for v in rng.integers(1, 6, 2))
        s, d = tuple(int(v) for v in rng.integers(1, 4, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
        p = tuple(int(rng.integers(0, kk * dd // 2 + 1)) for kk, dd in zip(k, d))
    span = [dd * (kk - 1) + 1 for kk, dd in zip(k, d)]
    hw = tuple(int(max(1, sp - 2 * pp) + rng.integers(0, 9)) for sp, pp in zip(span, p))
    n, cin, cout = int(rng.integers(1, 4)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
    return k, s, p, d, n, cin, cout, hw


def with_runs(rng, shape):
    """A random (N, C, H, W) array whose rows and columns repeat in runs, as FCN's maps do outside the
    image: a smaller random map with each row and column repeated a random number of times."""
    n, c, h, w = shape
    lines = [np.sort(rng.integers(0, max(1, size // int(rng.integers(2, 6))), size)) for size in (h, w)]
    small = rng.standard_normal((n, c, h, w))
    return small[:, :, lines[0]][:, :, :, lines[1]]


def _search_everything(monkeypatch):
    """The ``repeated-lines`` routes look at every stride-1 map and cut every run, however short,
    ``row-shifted`` takes small maps too (the sweep's maps are small), and ``winograd`` any batch and
    any channels (the sweep's have few), ``batch-folded`` any weight."""
    monkeypatch.setattr(conv_fast, "RUNS_LEAST_OUTPUTS", 1)
    monkeypatch.setattr(conv_fast, "RUNS_LEAST_SAVED", 1)
    monkeypatch.setattr(conv_fast, "RUNS_MAX_FRACTION", 1.0)
    monkeypatch.setattr(conv_fast, "ROW_SHIFTED_LEAST_OUTPUTS", 1)
    monkeypatch.setattr(conv_fast, "WINOGRAD_LEAST_BATCH", 1)
    monkeypatch.setattr(conv_fast, "WINOGRAD_LEAST_CHANNELS", 1)
    monkeypatch.setattr(conv_fast, "FOLD_LEAST_WEIGHT", 1)


def _count_cuts(monkeypatch):
    """Counter of the times the ``repeated-lines`` routes really cut a map (forward, both gradients)."""
    cuts = Counter()
    for op, name in ((FORWARD, "expand_output"), (WEIGHT_GRAD, "sum_into_cut"), (INPUT_GRAD, "put_lines")):
        def counted(*args, _fn=getattr(conv_fast, name), _op=op):
            cuts[_op] += 1
            return _fn(*args)
        monkeypatch.setattr(conv_fast, name, counted)
    return cuts


def summed_over_runs(dx, memo):
    """dx with each run of the forward's input (the layer's ``memo``) summed into one line, rows then
    columns: two gradients agree up to the runs (the same inner product with every change of the input
    that keeps them) exactly when these agree."""
    planned = next((v for k, v in memo.items() if k[0] == "repeated-lines" and len(k) > 2), None)
    if planned is None:
        return dx
    for axis, cut in zip((2, 3), planned[0]):
        pieces, done = [], 0
        for a, b in cut.runs:
            pieces += [np.take(dx, range(done, a), axis=axis), np.take(dx, range(a, b), axis=axis).sum(
                axis=axis, keepdims=True)]
            done = b
        dx = np.concatenate(pieces + [np.take(dx, range(done, dx.shape[axis]), axis=axis)], axis=axis)
    return dx


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _passes(layer, x, dy):
    for param in (layer.weight, layer.bias):  # stale numbers that a lazy zero_grad's first pass must all overwrite
        param.grad[...] = np.nan
    layer.zero_grad()
    y = layer(x)
    dx = layer.backward(dy)
    return {"forward": y, "input grad": dx, "weight grad": layer.weight.grad.copy(), "bias grad": layer.bias.grad.copy()}


@pytest.mark.parametrize("which", ["Conv2d", "ConvTranspose2d"])
def test_fast_routes_agree_with_the_textbook_on_random_geometries(which, monkeypatch):
    # small bands, so the band loops really cut the images (and share them between threads)
    monkeypatch.setitem(columns.BAND_BYTES, "numpy", 512)
    monkeypatch.setattr(columns, "MIN_COPY_BYTES", 64)
    monkeypatch.setitem(conv_fast.SHIFTED_BAND_BYTES, "numpy", 1024)
    monkeypatch.setitem(conv_fast.ROW_SHIFTED_BAND_BYTES, "numpy", 1024)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "2")
    _search_everything(monkeypatch)
    cuts = _count_cuts(monkeypatch)
    rng = np.random.default_rng(12 if which == "Conv2d" else 13)
    taken = Counter()
    for case in range(SWEEP):
        k, s, p, d, n, cin, cout, hw = random_geometry(rng)
        conv = Conv2d(cin, cout, k, s, p, d, dtype=np.float64, rng=case)
        conv_out = conv.output_shape((n, cin, *hw))
        if which == "Conv2d":
            layer, x_shape = conv, (n, cin, *hw)
        else:  # the transpose of that convolution, with the output_padding that returns to hw
            natural = ConvTranspose2d(cout, cin, k, s, p, dilation=d).output_shape(conv_out)
            op = tuple(h - nat for h, nat in zip(hw, natural[2:]))
            layer = ConvTranspose2d(cout, cin, k, s, p, op, d, dtype=np.float64, rng=case)
            x_shape = conv_out
        # half the cases repeat lines in the array a convolution's forward and weight gradient read:
        # x of a Conv2d, dy of a ConvTranspose2d (its backward is C's forward, and dW reads dy as C's input)
        repeats = bool(rng.integers(0, 2))
        x = with_runs(rng, x_shape) if repeats and which == "Conv2d" else rng.standard_normal(x_shape)
        # and a Conv2d with runs takes an input gradient up to them in half of those cases
        up_to_runs = which == "Conv2d" and repeats and bool(rng.integers(0, 2))
        if which == "Conv2d":
            layer.input_grad_up_to_runs = up_to_runs
        y_shape = layer.output_shape(x_shape)
        dy = with_runs(rng, y_shape) if repeats and which != "Conv2d" else rng.standard_normal(y_shape)
        with route("fast"):
            for name, (op_name, facts) in layer.route_facts(x_shape).items():
                chosen = routes.select(op_name, *facts)
                taken[(op_name, chosen.name)] += 1
                if chosen.data_dependent:  # and the route it hands over to without runs
                    taken[(op_name, routes.select(op_name, *facts, skip=(chosen.name,)).name)] += 1
            fast = _passes(layer, x, dy)
            memo = layer._cache[-1]         # a Conv2d's: the runs the fast forward found
        with route("textbook"):
            textbook = _passes(layer, x, dy)
        if up_to_runs:  # compared up to those runs
            fast["input grad"], textbook["input grad"] = (summed_over_runs(fast["input grad"], memo),
                                                          summed_over_runs(textbook["input grad"], memo))
        label = f"case {case}: {which} k{k} s{s} p{p} d{d} n{n} c{cin}->{cout} {x_shape}"
        for key in fast:
            assert _rel(fast[key], textbook[key]) < TOL, f"{label} {key}"
    for op in (FORWARD, INPUT_GRAD, WEIGHT_GRAD):  # each layer's passes reach every fast route
        for r in routes.routes(op)[:-1]:
            if (which, op, r.name) == ("ConvTranspose2d", INPUT_GRAD, "repeated-lines"):
                continue  # a transposed convolution's forward is no gradient: never up to runs
            assert taken[(op, r.name)] >= 3, (op, r.name, sorted(taken.items()))
    assert cuts[FORWARD] >= 5 and cuts[WEIGHT_GRAD] >= 5, cuts  # and runs were really cut
    assert which != "Conv2d" or cuts[INPUT_GRAD] >= 3, cuts


@pytest.mark.parametrize("op", [FORWARD, INPUT_GRAD, WEIGHT_GRAD])
def test_each_fast_route_alone_equals_the_textbook_where_it_applies(op, monkeypatch):
    """Call every fast route's own function (not through select) on geometries where its rule holds."""
    from minifcn.layers.conv_fast import conv_facts

    _search_everything(monkeypatch)
    rng = np.random.default_rng(21)
    textbook = routes.textbook(op)
    checked = Counter()
    for _ in range(150):
        k, s, p, d, n, cin, cout, hw = random_geometry(rng)
        x_shape, w_shape = (n, cin, *hw), (cout, cin, *k)
        facts = conv_facts(x_shape, w_shape, s, p, d)
        u = facts[0]
        if min(u.out_hw) < 1:
            continue
        x = with_runs(rng, x_shape) if rng.integers(0, 2) else rng.standard_normal(x_shape)
        w, dy = rng.standard_normal(w_shape), rng.standard_normal((n, cout, *u.out_hw))
        if op == FORWARD:
            args = (x, w, s, p, d, None, rng.standard_normal(cout))
        elif op == INPUT_GRAD:
            args = (dy, w, x_shape, s, p, d)
        else:
            args = (dy, x, w_shape, s, p, d)
        want = textbook.fn(*args)
        # an input gradient taken up to runs: without a layer's memo (the forward's runs) it is the exact one
        rule_facts = (*facts, True) if op == INPUT_GRAD else facts
        for r in routes.routes(op)[:-1]:
            if r.applies(*rule_facts):
                assert _rel(r.fn(*args), want) < TOL, (r.name, k, s, p, d, x_shape, w_shape)
                if op == WEIGHT_GRAD:  # added into what is there, or stored over stale numbers (NaN)
                    base = rng.standard_normal(w_shape)
                    added = r.fn(*args, accumulate=base.copy())
                    assert _rel(added - base, want) < TOL, (r.name, "added", k, s, p, d, x_shape, w_shape)
                    stored = r.fn(*args, accumulate=np.full(w_shape, np.nan), overwrite=True)
                    assert _rel(stored, want) < TOL, (r.name, "overwrite", k, s, p, d, x_shape, w_shape)
                checked[r.name] += 1
    assert all(checked[r.name] >= 5 for r in routes.routes(op)[:-1]), checked


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL), (np.float32, 1e-5)])
def test_shifted_routes_equal_the_textbook_in_both_dtypes(dtype, tol, monkeypatch):
    """conv1_2's geometry (8 -> 8, 3x3, padding 1) and odd ones, with and without bands, float64 and float32."""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")  # select() names the route the fast mode takes
    rng = np.random.default_rng(31)
    cases = [((2, 8, 37, 29), (8, 8, 3, 3), (1, 1), (1, 1)), ((1, 5, 20, 23), (3, 5, 2, 4), (0, 2), (2, 1)),
             ((3, 12, 11, 9), (8, 12, 3, 1), (1, 0), (1, 2)), ((2, 3, 9, 14), (6, 3, 3, 3), (1, 1), (1, 1)),
             ((8, 24, 9, 11), (40, 24, 3, 3), (1, 1), (1, 1))]  # a batch of 8: wider channels take it too
    checked = Counter()
    for budget in (0, 2048):  # one band, then bands of a few rows
        monkeypatch.setitem(conv_fast.SHIFTED_BAND_BYTES, "numpy", budget)
        for x_shape, w_shape, p, d in cases:
            x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
            b = rng.standard_normal(w_shape[0]).astype(dtype)
            facts = conv_fast.conv_facts(x_shape, w_shape, (1, 1), p, d)
            dy = rng.standard_normal((x_shape[0], w_shape[0], *facts[0].out_hw)).astype(dtype)
            label = (budget, x_shape, w_shape, p, d)
            if routes.select(FORWARD, *facts).name == "shifted":
                got = conv_fast.forward_by_shifted_products(x, w, (1, 1), p, d, None, b)
                want = routes.textbook(FORWARD).fn(x, w, (1, 1), p, d, None, b)
                assert got.dtype == dtype and _rel(got, want) < tol, label
                checked[FORWARD] += 1
            if routes.select(WEIGHT_GRAD, *facts).name == "shifted":
                acc = rng.standard_normal(w_shape).astype(dtype)
                want = routes.textbook(WEIGHT_GRAD).fn(dy, x, w_shape, (1, 1), p, d, accumulate=acc.copy())
                got = conv_fast.weight_grad_by_shifted_products(dy, x, w_shape, (1, 1), p, d, accumulate=acc.copy())
                assert got.dtype == dtype and _rel(got, want) < tol, label
                checked[WEIGHT_GRAD] += 1
    assert checked == {FORWARD: 8, WEIGHT_GRAD: 8}, checked


def test_shifted_rule_widens_only_for_batches_of_shifted_batch_images(monkeypatch):
    """Up to 64 channels in and out, Cout <= 2 Cin, from a batch of SHIFTED_BATCH images; fewer keep the narrow rule.
    (``winograd``, tried first, takes several of these geometries: off here.)"""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    monkeypatch.setattr(conv_fast, "WINOGRAD_LEAST_BATCH", 10**9)
    def chosen(op, n, cin, cout):
        return routes.select(op, *conv_fast.conv_facts((n, cin, 33, 33), (cout, cin, 3, 3), (1, 1), (1, 1), (1, 1))).name

    big = conv_fast.SHIFTED_BATCH
    most = conv_fast.SHIFTED_BATCH_MOST_CHANNELS
    for op in (FORWARD, WEIGHT_GRAD):
        assert chosen(op, big, most, most) == "shifted"
        assert chosen(op, big - 1, most, most) != "shifted"
        assert chosen(op, big, most + 1, most) != "shifted"
        assert chosen(op, big, most, most + 1) != "shifted"
        assert chosen(op, big, most // 2, most) == "shifted"      # Cout = 2 Cin
        assert chosen(op, big, most // 2 - 1, most) != "shifted"  # fewer in: the products are too thin
    assert chosen(FORWARD, big, 3, 8) != "shifted"  # 3 channels in stay too thin for the forward
    assert chosen(WEIGHT_GRAD, big, 3, 8) == "shifted"  # the narrow rule, at any batch


def test_shifted_forward_cuts_to_out_hw(monkeypatch):
    """A transposed convolution's backward asks for fewer output rows and columns than the natural size."""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    rng = np.random.default_rng(32)
    x, w = rng.standard_normal((2, 6, 12, 10)), rng.standard_normal((7, 6, 3, 3))
    facts = conv_fast.conv_facts(x.shape, w.shape, (1, 1), (1, 1), (1, 1), (9, 8))
    assert routes.select(FORWARD, *facts).name == "shifted"
    want = routes.textbook(FORWARD).fn(x, w, (1, 1), (1, 1), (1, 1), (9, 8))
    assert _rel(conv_fast.forward_by_shifted_products(x, w, (1, 1), (1, 1), (1, 1), (9, 8)), want) < TOL


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL), (np.float32, 1e-5)])
@pytest.mark.parametrize("band_bytes", [0, 3000])
def test_row_shifted_forward_equals_the_textbook(dtype, tol, band_bytes, monkeypatch):
    """conv3_2's geometry (32 -> 32, 3x3, padding 1) and odd ones (dilation, tall and flat kernels, a batch
    cut into bands of a few rows shared by two threads), float64 and float32."""
    monkeypatch.setitem(conv_fast.ROW_SHIFTED_BAND_BYTES, "numpy", band_bytes)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "2")
    rng = np.random.default_rng(33)
    cases = [((1, 32, 64, 61), (32, 32, 3, 3), (1, 1), (1, 1)), ((3, 5, 70, 66), (7, 5, 2, 4), (0, 2), (2, 1)),
             ((2, 3, 62, 80), (32, 3, 5, 1), (2, 0), (1, 3))]
    for x_shape, w_shape, p, d in cases:
        x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
        b = rng.standard_normal(w_shape[0]).astype(dtype)
        assert conv_fast.row_shifted_applies(*conv_fast.conv_facts(x_shape, w_shape, (1, 1), p, d))
        got = conv_fast.forward_by_row_shifts(x, w, (1, 1), p, d, None, b)
        want = routes.textbook(FORWARD).fn(x, w, (1, 1), p, d, None, b)
        assert got.dtype == dtype and _rel(got, want) < tol, (x_shape, w_shape, p, d)


def _count_unfoldings(monkeypatch):
    shapes = []
    real = columns.Unfolding.unfold

    def counted(self, xpad, r0, r1, out=None):
        shapes.append(self.x_shape)
        return real(self, xpad, r0, r1, out)

    monkeypatch.setattr(columns.Unfolding, "unfold", counted)
    return shapes


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_weight_gradient_multiplies_the_forwards_columns_in_training(dtype, monkeypatch):
    """A training Conv2d on the bands route unfolds x once a step: its weight gradient takes the columns
    its forward kept (the same bits as unfolding again); in eval mode, or with a frozen weight, nothing is
    kept and the weight gradient unfolds x itself."""
    rng = np.random.default_rng(30)
    x = rng.standard_normal((1, 16, 20, 20)).astype(dtype)
    dy = rng.standard_normal((1, 24, 20, 20)).astype(dtype)
    layer = Conv2d(16, 24, 3, padding=1, dtype=dtype, rng=0)
    with route("fast"):
        assert routes.select(FORWARD, *layer.route_facts(x.shape)["forward"][1]).name == "bands"
    unfolded = _count_unfoldings(monkeypatch)
    grads = {}
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        layer.zero_grad()
        unfolded.clear()
        with route("fast"):
            layer(x)
            assert (conv_fast._KEPT in layer._cache[2]) == (mode == "train")
            layer.backward(dy)
        assert unfolded.count(x.shape) == (1 if mode == "train" else 2), (mode, unfolded)
        grads[mode] = layer.weight.grad.copy()
    np.testing.assert_array_equal(grads["train"], grads["eval"])
    layer.train()
    with route("textbook"):
        layer.zero_grad()
        layer(x)
        layer.backward(dy)
    np.testing.assert_allclose(grads["train"], layer.weight.grad, rtol=1e-5 if dtype == np.float32 else 1e-12,
                               atol=1e-5 * np.abs(layer.weight.grad).max())
    layer.weight.trainable = False
    with route("fast"):
        layer(x)
    assert conv_fast._KEPT not in layer._cache[2]


def test_kept_columns_serve_only_the_input_they_were_made_of(monkeypatch):
    """The weight gradient of another x of the same shape unfolds that x (the kept columns are x's own),
    and columns larger than a band are not kept at all."""
    rng = np.random.default_rng(31)
    x, other = rng.standard_normal((2, 1, 16, 20, 20))
    dy = rng.standard_normal((1, 24, 20, 20))
    layer = Conv2d(16, 24, 3, padding=1, dtype=np.float64, rng=0)
    with route("fast"):
        layer(x)
    memo = layer._cache[2]
    got = conv_fast.weight_grad_by_bands(dy, other, layer.weight.shape, (1, 1), (1, 1), (1, 1), memo=memo)
    want = routes.textbook(WEIGHT_GRAD).fn(dy, other, layer.weight.shape, (1, 1), (1, 1), (1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    monkeypatch.setitem(columns.BAND_BYTES, "numpy", 16 * 9 * 400 * 8 - 8)  # one element too few
    fresh = Conv2d(16, 24, 3, padding=1, dtype=np.float64, rng=0)
    with route("fast"):
        fresh(x)
    assert conv_fast._KEPT not in fresh._cache[2] and not fresh._across_calls


def test_the_facts_of_a_geometry_are_built_once():
    from minifcn.layers.conv_fast import conv_facts, padding_core

    u, cout = conv_facts((2, 3, 9, 8), (4, 3, 3, 3), (1, 1), (100, 100), (1, 1))
    again = conv_facts([2, 3, 9, 8], np.zeros((4, 3, 3, 3)).shape, [1, 1], (100, 100), (1, 1), None)
    assert again[0] is u and again[1] == cout == 4 and isinstance(cout, int)
    assert conv_facts((2, 3, 9, 8), (4, 3, 3, 3), (1, 1), (99, 100), (1, 1))[0] is not u
    assert conv_facts((2, 3, 9, 8), (4, 3, 3, 3), (1, 1), (100, 100), (1, 1), (200, 200))[0] is not u
    assert padding_core(u) is padding_core(u) and padding_core(u)[2] == (2, 2)  # 100 - 98, the core's padding


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL), (np.float32, 1e-5)])
def test_channel_diagonal_routes_equal_the_textbook_where_the_weight_is_one_kernel_per_channel(dtype, tol):
    """FCN's fixed upsampling (bilinear, kernel 2s, stride s) and other strided geometries: where the weight is
    one kernel from each channel to itself, the single-channel route; any other weight is handed over."""
    from minifcn.layers import bilinear_kernel

    rng = np.random.default_rng(41)
    # (x of C: N, C, H, W), kernel, stride, padding, dilation
    cases = [((2, 3, 12, 10), (4, 4), (2, 2), (1, 1), (1, 1)), ((1, 6, 40, 40), (16, 16), (8, 8), (4, 4), (1, 1)),
             ((3, 2, 9, 11), (3, 2), (2, 3), (0, 1), (2, 1)), ((2, 4, 8, 8), (4, 4), (2, 2), (0, 0), (1, 1))]
    for x_shape, k, s, p, d in cases:
        n, c = x_shape[:2]
        one = rng.standard_normal((1, 1, *k)) if k != (16, 16) else bilinear_kernel(1, 1, 16, np.float64)
        weight = (np.eye(c)[:, :, None, None] * one).astype(dtype)
        facts = conv_fast.conv_facts(x_shape, weight.shape, s, p, d)
        x = rng.standard_normal(x_shape).astype(dtype)
        dy = rng.standard_normal((n, c, *facts[0].out_hw)).astype(dtype)
        bias = rng.standard_normal(c).astype(dtype)
        stray = weight.copy()
        stray[c - 1, 0, 0, -1] = 1e-3                  # one weight between two channels
        uneven = weight.copy()
        uneven[-1, -1] *= 2                            # another kernel on the last channel
        with route("fast"):
            assert routes.select(FORWARD, *facts).name == routes.select(INPUT_GRAD, *facts, False).name == \
                "channel-diagonal"
            for w, single in ((weight, True), (stray, False), (uneven, False)):
                assert (conv_fast.one_kernel_per_channel(w) is not None) == single
                label = (x_shape, k, s, p, d, single)
                got = conv_fast.forward_channel_by_channel(x, w, s, p, d, None, bias)
                want = routes.textbook(FORWARD).fn(x, w, s, p, d, None, bias)
                assert got.dtype == dtype and _rel(got, want) < tol, label
                got = conv_fast.input_grad_channel_by_channel(dy, w, x_shape, s, p, d)
                want = routes.textbook(INPUT_GRAD).fn(dy, w, x_shape, s, p, d)
                assert got.shape == x_shape and _rel(got, want) < tol, label


@pytest.mark.parametrize("dtype,tol", [(np.float64, TOL), (np.float32, 1e-5)])
def test_bias_gradient_as_a_product_with_ones_is_the_sum(dtype, tol):
    from minifcn.layers.conv_fast import BIAS_GRAD, bias_grad_by_ones

    rng = np.random.default_rng(51)
    for shape in [(1, 8, 294, 294), (3, 5, 7, 2), (2, 1, 1, 1), (4, 6, 9, 11)]:
        dy = rng.standard_normal(shape).astype(dtype)
        want = routes.textbook(BIAS_GRAD).fn(dy)
        for view in (dy, dy[:, :, ::-1], np.asfortranarray(dy)):  # any layout
            got = bias_grad_by_ones(view)
            assert got.dtype == dtype and got.shape == (shape[1],) and _rel(got, want) < tol, shape
    with route("fast"):
        assert routes.select(BIAS_GRAD, (1, 2, 3, 4)).name == "ones-product"
