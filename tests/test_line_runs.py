"""minifcn.layers.line_runs: runs of identical lines are found exactly, and cutting them is exact.

The convolution routes built on it (``repeated-lines``) are checked against the
textbook route in tests/test_conv_fast.py; here, the pieces: which runs are
found (and which are not), the bookkeeping of a cut, that summing dy onto
the cut output is the adjoint of expanding the cut output, and that an input
gradient up to runs is what its name says: not ``C^T dy``, but the same inner
product with every change of the input that keeps its runs.
"""
from __future__ import annotations

import numpy as np
import pytest

from minifcn import route
from minifcn.layers import Conv2d, conv_fast, line_runs
from minifcn.layers.line_runs import (LineCut, cut_map, expand_output, find_runs, plan_cuts, put_lines,
                                      sum_into_cut, take_lines)
from minifcn.routes import ACROSS_CALLS


def repeated(rng, shape, row_counts, col_counts):
    """A random map of ``shape``'s (N, C) whose i-th distinct row appears row_counts[i] times (likewise columns)."""
    n, c = shape
    small = rng.standard_normal((n, c, len(row_counts), len(col_counts)))
    return np.repeat(np.repeat(small, row_counts, axis=2), col_counts, axis=3)


def test_finds_the_runs_and_only_them():
    x = repeated(np.random.default_rng(0), (2, 5), [1, 9, 1, 2, 12], [20, 1, 1, 7])
    assert find_runs(x, 2, 3) == [(1, 10), (13, 25)]
    assert find_runs(x, 2, 10) == [(13, 25)]
    assert find_runs(x, 3, 3) == [(0, 20), (22, 29)]
    assert find_runs(x, 3, 21) == []


@pytest.mark.parametrize("where", ["channel 1 (not probed)", "image 1 (not probed)"])
def test_a_line_that_differs_where_the_probe_does_not_look_splits_the_run(where):
    """The probe reads three channels of the first image; the check reads everything."""
    x = repeated(np.random.default_rng(1), (2, 5), [12], [4, 6])
    assert find_runs(x, 2, 3) == [(0, 12)]
    if where.startswith("channel"):
        x[0, 1, 5, 2] += 1.0        # channels 0, 2 and 4 are probed
    else:
        x[1, 0, 5, 2] += 1.0
    assert find_runs(x, 2, 3) == [(0, 5), (6, 12)]
    assert find_runs(x, 2, 7) == []


def test_nan_lines_never_match():
    x = repeated(np.random.default_rng(2), (1, 3), [10], [5])
    x[:, :, 4:, 0] = np.nan
    assert find_runs(x, 2, 3) == [(0, 4)]


@pytest.mark.parametrize("span,padding", [(1, 0), (3, 1), (3, 0), (5, 4), (2, 3)])
def test_segments_cover_every_output_once(span, padding):
    cut = LineCut(((2, 12), (12, 20), (25, 40)), span, padding, 44)
    covered = []
    for f0, f1, c0, c1 in cut.segments:
        assert c1 - c0 in (1, f1 - f0)
        covered += range(f0, f1)
    assert covered == list(range(cut.out_size))
    assert cut.segments[-1][3] == cut.cut_out_size
    assert len(cut.keep) == 44 - sum(b - a - span for a, b in cut.runs)


def test_summing_onto_the_cut_is_the_adjoint_of_expanding():
    """<expand(a), b> == <a, sum_into_cut(b)> for every a, b: the weight gradient's shortcut is exact."""
    rng = np.random.default_rng(3)
    x = repeated(rng, (2, 3), [1, 8, 2, 9], [6, 1, 10])
    cuts, cut_x = plan_cuts(x, (3, 2), (1, 0), (1, 2), 1)
    assert all(c.runs for c in cuts) and cut_x.shape[2:] == tuple(len(c.keep) for c in cuts)
    a = rng.standard_normal((2, 4, cuts[0].cut_out_size, cuts[1].cut_out_size))
    b = rng.standard_normal((2, 4, cuts[0].out_size, cuts[1].out_size))
    assert np.isclose(np.vdot(expand_output(a, cuts), b), np.vdot(a, sum_into_cut(b, cuts)), rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 2e-5)])
def test_fcn_like_map_is_cut_and_the_layer_still_agrees(dtype, tol):
    """A map constant outside a core with a one-line border ring (conv1_2's input at a small size):
    the forward reads a small fraction of it and both passes match the textbook route."""
    rng = np.random.default_rng(4)
    x = np.empty((1, 8, 90, 90), dtype=dtype)
    x[...] = rng.standard_normal((1, 8, 1, 1))
    x[:, :, 30:60, 30:60] = rng.standard_normal((1, 8, 30, 30))
    x[:, :, :, 0] = x[:, :, :, -1] = 0.5
    cuts, cut_x = plan_cuts(x, (3, 3), (1, 1), (1, 1), 4)
    assert line_runs.saved_fraction(cuts) < 0.25 and cut_x.shape == (1, 8, 36, 38)
    layer = Conv2d(8, 8, 3, padding=1, dtype=dtype, rng=0)
    dy = rng.standard_normal((1, 8, 90, 90)).astype(dtype)
    results = {}
    for mode in ("fast", "textbook"):
        layer.zero_grad()
        with route(mode):
            y = layer(x)
            layer.backward(dy)
        results[mode] = (y, layer.weight.grad.copy())
    for fast, textbook in zip(results["fast"], results["textbook"]):
        assert fast.dtype == dtype
        np.testing.assert_allclose(fast, textbook, rtol=tol, atol=tol * np.abs(textbook).max())


def test_the_weight_gradient_reads_the_runs_its_forward_found(monkeypatch):
    """A Conv2d keeps its forward's plan (the layer's memo) for its weight gradient: one search a step,
    not two; the route functions called on their own search each time."""
    rng = np.random.default_rng(5)
    x = repeated(rng, (2, 4), [30, 1, 2, 40], [25, 3, 1, 30])
    searches = []

    def counted(*args, **kwargs):
        searches.append(args[0].shape)
        return plan_cuts(*args, **kwargs)

    monkeypatch.setattr(conv_fast, "plan_cuts", counted)
    layer = Conv2d(4, 3, 3, padding=1, dtype=np.float64, rng=0)
    with route("fast"):
        y = layer(x)
        layer.backward(np.ones_like(y))
        assert searches == [x.shape]
        dy = rng.standard_normal(y.shape)
        conv_fast.weight_grad_on_cut_runs(dy, x, layer.weight.shape, (1, 1), (1, 1), (1, 1))
        assert searches == [x.shape, x.shape]
    with route("textbook"):
        want = layer.weight.grad.copy()
        layer.zero_grad()
        layer(x)
        layer.backward(np.ones_like(y))
    np.testing.assert_allclose(want, layer.weight.grad, rtol=1e-11)


def test_putting_lines_back_is_the_adjoint_of_cutting():
    """<put_lines(a), b> == <a, cut(b)>: T^T of the input gradient up to runs."""
    rng = np.random.default_rng(6)
    x = repeated(rng, (2, 3), [3, 9, 1, 11], [8, 2, 12])
    cuts, cut_x = plan_cuts(x, (3, 3), (1, 1), (1, 1), 2)
    assert all(c.runs for c in cuts)
    a, b = rng.standard_normal(cut_x.shape), rng.standard_normal(x.shape)
    cut_b = take_lines(take_lines(b, 2, cuts[0]), 3, cuts[1])
    assert np.isclose(np.vdot(put_lines(a, cuts, x.shape), b), np.vdot(a, cut_b), rtol=1e-12)
    np.testing.assert_array_equal(take_lines(take_lines(put_lines(a, cuts, x.shape), 2, cuts[0]), 3, cuts[1]), a)
    assert np.array_equal(cut_b, b[:, :, cuts[0].keep][:, :, :, cuts[1].keep])  # the kept lines, in order


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-11), (np.float32, 2e-5)])
def test_an_input_gradient_up_to_runs_acts_as_the_exact_one_on_changes_that_keep_them(dtype, tol):
    """On an FCN-like map: dx up to runs differs from C^T dy, but <dx, v> is the same for every v with the
    input's runs (the changes of x the layers below can make), and the weight gradient is unchanged."""
    rng = np.random.default_rng(7)
    x = np.empty((2, 8, 90, 90), dtype=dtype)
    x[...] = rng.standard_normal((2, 8, 1, 1))
    x[:, :, 30:60, 30:60] = rng.standard_normal((2, 8, 30, 30))
    layer = Conv2d(8, 4, 3, padding=1, dtype=dtype, rng=0)
    dy = rng.standard_normal((2, 4, 90, 90)).astype(dtype)
    grads = {}
    for up_to_runs in (False, True):
        layer.input_grad_up_to_runs = up_to_runs
        layer.zero_grad()
        with route("fast"):
            layer(x)
            grads[up_to_runs] = (layer.backward(dy), layer.weight.grad.copy(), layer.bias.grad.copy())
    (exact, dw, db), (cut, dw_cut, db_cut) = grads[False], grads[True]
    assert cut.dtype == dtype and np.abs(cut - exact).max() > 0.1 * np.abs(exact).max()  # not C^T dy
    def gap(v):  # |<dx_cut - dx, v>| against the size of the terms
        return float(abs(np.vdot(cut, v) - np.vdot(exact, v)) / (np.abs(exact).sum() * np.abs(v).max()))

    for _ in range(5):  # changes that keep the runs: constant outside the core, like x itself
        v = np.empty_like(x)
        v[...] = rng.standard_normal((2, 8, 1, 1))
        v[:, :, 30:60, 30:60] = rng.standard_normal((2, 8, 30, 30))
        assert gap(v) < tol
    np.testing.assert_allclose(dw_cut, dw, rtol=tol, atol=tol * np.abs(dw).max())
    np.testing.assert_allclose(db_cut, db, rtol=tol)
    assert gap(rng.standard_normal(x.shape).astype(dtype)) > 1e-3  # a change that breaks the runs: they differ


def test_an_input_gradient_wanted_for_itself_is_exact():
    """The layer's switch is off by default, and without the forward's runs (no memo, or textbook mode)
    the route hands over to the exact one."""
    rng = np.random.default_rng(8)
    x = repeated(rng, (1, 4), [40, 2, 40], [35, 1, 45])
    layer = Conv2d(4, 4, 3, padding=1, dtype=np.float64, rng=0)
    assert layer.input_grad_up_to_runs is False
    dy = rng.standard_normal(layer.output_shape(x.shape))
    with route("textbook"):
        layer(x)
        want = layer.backward(dy)
    for up_to_runs, mode in ((False, "fast"), (True, "textbook")):
        layer.input_grad_up_to_runs = up_to_runs
        with route(mode):
            layer(x)
            np.testing.assert_allclose(layer.backward(dy), want, rtol=1e-12)
    got = conv_fast.input_grad_up_to_runs(dy, layer.weight.data, x.shape, (1, 1), (1, 1), (1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_both_gradients_sum_dy_onto_the_cut_once(monkeypatch):
    """The weight gradient and the input gradient up to runs share one summed dy, and the layer's memo
    does not keep it (nor dy) after the backward."""
    rng = np.random.default_rng(9)
    x = repeated(rng, (1, 4), [30, 1, 2, 40], [25, 3, 1, 30])
    sums = []
    monkeypatch.setattr(conv_fast, "sum_into_cut", lambda *a, _f=conv_fast.sum_into_cut: sums.append(1) or _f(*a))
    layer = Conv2d(4, 3, 3, padding=1, dtype=np.float64, rng=0)
    layer.input_grad_up_to_runs = True
    with route("fast"):
        y = layer(x)
        layer.backward(rng.standard_normal(y.shape))
    assert len(sums) == 1
    kept = [key for key in layer._cache[2] if key != ACROSS_CALLS]
    assert kept and all(len(key) > 2 for key in kept), kept  # only the forward's plan (and the hints)


def test_a_hint_is_taken_where_its_runs_are_whole_runs_of_the_input_and_only_there():
    """plan_cuts with the cuts of an earlier input: the same cuts where each of their runs is a whole run
    of x (no search), a search where one is not (a line changed in an image and channel no probe reads;
    a run grown by a line: the search's cuts, not the hint's), and no use at all for another shape."""
    rng = np.random.default_rng(10)
    x = repeated(rng, (2, 5), [30, 1, 2, 40], [25, 3, 1, 30])
    searched = plan_cuts(x, (3, 3), (1, 1), (1, 1), 4)
    x2 = repeated(rng, (2, 5), [30, 1, 2, 40], [25, 3, 1, 30])     # new values, the same runs
    cuts, cut_x = plan_cuts(x2, (3, 3), (1, 1), (1, 1), 4, hint=searched[0])
    assert cuts is searched[0]
    np.testing.assert_array_equal(cut_x, plan_cuts(x2, (3, 3), (1, 1), (1, 1), 4)[1])
    x2[1, 3, 50, 7] += 1.0                              # row 50 no longer repeats row 33, nor column 7 column 6
    assert cut_map(x2, searched[0]) is None
    cuts, cut_x = plan_cuts(x2, (3, 3), (1, 1), (1, 1), 4, hint=searched[0])
    assert cuts[0].runs == ((0, 30), (33, 50), (51, 73)) and cuts[1].runs == ((0, 7), (8, 25), (29, 59))
    np.testing.assert_array_equal(cut_x, plan_cuts(x2, (3, 3), (1, 1), (1, 1), 4)[1])
    longer = repeated(rng, (2, 5), [31, 1, 1, 40], [25, 3, 1, 30])  # the first run now one row longer
    cuts, _ = plan_cuts(longer, (3, 3), (1, 1), (1, 1), 4, hint=searched[0])
    assert cuts[0].runs == ((0, 31), (33, 73)) == plan_cuts(longer, (3, 3), (1, 1), (1, 1), 4)[0][0].runs
    base = repeated(rng, (2, 5), [3, 30, 2, 38], [25, 3, 1, 30])
    earlier = repeated(rng, (2, 5), [2, 31, 2, 38], [25, 3, 1, 30])  # a run that starts a row earlier
    cuts, _ = plan_cuts(earlier, (3, 3), (1, 1), (1, 1), 4, hint=plan_cuts(base, (3, 3), (1, 1), (1, 1), 4)[0])
    assert cuts[0].runs == ((2, 33), (35, 73))
    other = repeated(rng, (2, 5), [20, 1, 2, 40], [25, 3, 1, 30])   # 63 rows, not 73: the hint is not for it
    assert plan_cuts(other, (3, 3), (1, 1), (1, 1), 4, hint=searched[0])[0][0].runs == ((0, 20), (23, 63))


def test_a_layer_checks_its_last_inputs_runs_instead_of_searching(monkeypatch):
    """Conv2d's second forward on an input of the same shape checks the runs of the first (no search for
    candidates) and is exact; where one of them broke, it searches and is exact again."""
    rng = np.random.default_rng(11)
    layer = Conv2d(4, 3, 3, padding=1, dtype=np.float64, rng=0)
    searches = []
    monkeypatch.setattr(line_runs, "find_runs", lambda *a, _f=line_runs.find_runs: searches.append(1) or _f(*a))
    inputs = [repeated(rng, (2, 4), [30, 1, 2, 40], [25, 3, 1, 30]) for _ in range(3)]
    inputs[2][1, 1, 40, :] += 1.0                                    # breaks a row run of the first two
    for k, (x, searched) in enumerate(zip(inputs, (True, False, True))):
        searches.clear()
        with route("fast"):
            got = layer(x)
            layer.backward(np.ones_like(got))
        assert bool(searches) == searched, k
        with route("textbook"):
            want = layer(x)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    for side in range(60, 72):                                       # hints of a few shapes only
        with route("fast"):
            layer(repeated(rng, (1, 4), [side - 10, 10], [20, 30]))
    hints = [key for key in layer._across_calls if key[0] == "repeated-lines"]
    assert 1 <= len(hints) <= conv_fast.RUNS_HINTS_KEPT
