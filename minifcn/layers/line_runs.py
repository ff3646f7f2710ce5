"""Runs of identical lines in a feature map: find them, cut each to what a kernel reads, expand back.

FCN pads conv1_1 by 100 pixels. Outside the image's footprint conv1_1's output
is its bias, so every map from conv1_2 to conv3 is the same row after row (and
column after column) there, but for thin rings at the map's own border: each
layer maps identical neighbourhoods to identical outputs. A stride-1
convolution whose kernel spans ``e = d*(k-1) + 1`` lines along an axis maps a
run of L identical input lines to ``L - e + 1`` identical output lines, and no
output reads more than e lines of the run. So it may run on the map with every
run cut to its first e lines (:class:`LineCut`), and each run's one inner output
line be repeated ``L - e + 1`` times afterwards; the weight gradient likewise
runs on the cut map with dy summed over each run's inner output lines. The
answers are the same numbers, from a fraction of the work.

Lines are compared exactly (``==`` over every image and channel): NaNs never
match, so a map holding them is never cut.

**Input gradients up to runs.** dy does not repeat, so the exact input
gradient ``C^T dy`` cannot be cut. But a layer below uses dx only through
``<dx, v>`` for the changes v of x its parameters can make, and where the runs
come from padding (FCN) every such change keeps them: outside the image a map
stays constant line after line for any weights. For those v, ``C v`` is the cut
convolution's output expanded, so the cut map's input gradient of the summed dy,
put back on the kept lines (:func:`put_lines`, zeros elsewhere), gives the same
``<dx, v>``: the same sums over each run, though not the same values. Every
parameter gradient below comes out exact. A layer takes such a dx only when it
is told so (``Conv2d.input_grad_up_to_runs``; FCN sets it while its input
gradient is off, ``model.input_grad = False``); an input gradient wanted for
itself (a gradient check, a saliency map) is always the exact one.

**Hints.** FCN's runs come from its padding, so a layer's input has the same
runs step after step, but for the first steps of training (while the rings at
the map's border settle). :func:`plan_cuts` takes the cuts of the layer's last
input of the same shape as a hint and checks that each of its runs is a whole
run of the new input (exact comparisons) instead of searching for candidates
again; where one is not, it searches. Cuts of other sizes would give other
float roundings (the weight gradient sums its bands in another order), so a
hint is taken only where it is what the search would find.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from ..backend import get_array_module, to_numpy


def _runs_of_true(same, least):
    """[(a, b)]: the lines a..b-1 with ``same[a..b-2]`` all True (line i+1 equals line i), b - a >= least."""
    edges = np.diff(np.concatenate(([0], np.asarray(same, dtype=np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)  # same[start:end] all True
    return [(int(a), int(b) + 1) for a, b in zip(starts, ends) if b + 1 - a >= least]


def _lines(x, axis, a, b):
    return x[:, :, a:b] if axis == 2 else x[:, :, :, a:b]


def _all_but(cmp, axis):
    return cmp.all(axis=tuple(i for i in range(4) if i != axis))


def find_runs(x, axis, least):
    """Maximal runs ``[(a, b)]`` of at least ``least`` identical lines of x (N, C, H, W) along ``axis``
    (2: rows, 3: columns), identical in every image and channel.

    Candidates come from three or four channels of the first image (a cheap pass: a
    channel that is zero there, as a ReLU's gradient may be, does not decide
    alone); each is then checked on the whole batch, and split where it fails.
    """
    if least < 2 or x.shape[axis] < least or x.size == 0:
        return []
    probe = x[0, ::max(1, (x.shape[1] - 1) // 2)]            # (at most 4 channels, H, W), spread over C; a view
    same = ((probe[:, 1:] == probe[:, :-1]).all(axis=(0, 2)) if axis == 2 else
            (probe[:, :, 1:] == probe[:, :, :-1]).all(axis=(0, 1)))
    same = to_numpy(same)
    if not same.any():
        return []
    runs = []
    for a, b in _runs_of_true(same, least):
        if run_holds(x, axis, a, b):                            # the usual case: one whole comparison
            runs.append((a, b))
            continue
        block = _lines(x, axis, a, b)
        exact = to_numpy(_all_but(_lines(block, axis, 1, b - a) == _lines(block, axis, 0, b - a - 1), axis))
        runs.extend((a + s, a + t) for s, t in _runs_of_true(exact, least))
    return runs


def run_holds(x, axis, a, b):
    """Lines a..b-1 of x (N, C, H, W) along ``axis`` all equal line a, exactly, in every image and channel."""
    return bool((_lines(x, axis, a, b) == _lines(x, axis, a, a + 1)).all())


@dataclass(frozen=True)
class LineCut:
    """Along one axis of a stride-1 convolution: which input lines to keep, and where the outputs go.

    ``runs`` are runs of identical input lines (input coordinates), each longer
    than the kernel's span ``span`` (``d*(k-1) + 1``); ``padding`` is the
    convolution's on this axis and ``size`` the input's length. Each run keeps
    its first ``span`` lines. Output line ``o`` of the full convolution reads
    input lines ``o - padding .. o - padding + span - 1``, so run ``[a, b)`` has
    the inner outputs ``a + padding .. b + padding - span`` (``b - a - span + 1``
    equal lines), which the cut convolution computes once.
    """

    runs: tuple
    span: int
    padding: int
    size: int

    @cached_property
    def keep(self):
        """Indices of the input lines the cut map keeps, in order."""
        mask = np.ones(self.size, dtype=bool)
        for a, b in self.runs:
            mask[a + self.span:b] = False
        return np.flatnonzero(mask)

    @cached_property
    def kept_ranges(self):
        """[(full0, full1, cut0, cut1)]: input lines full0..full1-1 are the cut map's lines cut0..cut1-1."""
        keep = self.keep
        starts = np.flatnonzero(np.diff(keep, prepend=-2) != 1)      # where a range of consecutive lines begins
        ends = np.append(starts[1:], len(keep))
        return [(int(keep[a]), int(keep[b - 1]) + 1, int(a), int(b)) for a, b in zip(starts, ends)]

    @property
    def out_size(self):
        """Output length of the full convolution."""
        return self.size + 2 * self.padding - self.span + 1

    @cached_property
    def segments(self):
        """[(full0, full1, cut0, cut1)]: full output lines full0..full1-1 come from cut output lines
        cut0..cut1-1, one to one, or all from the one line cut0 where ``cut1 - cut0 == 1 < full1 - full0``."""
        out, done, removed = [], 0, 0
        for a, b in self.runs:
            first, end = a + self.padding, b + self.padding - self.span + 1   # the run's inner outputs
            if first > done:
                out.append((done, first, done - removed, first - removed))
            out.append((first, end, first - removed, first - removed + 1))
            done, removed = end, removed + (b - a - self.span)
        if done < self.out_size:
            out.append((done, self.out_size, done - removed, self.out_size - removed))
        return out

    @cached_property
    def cut_out_size(self):
        return self.out_size - sum(b - a - self.span for a, b in self.runs)


def plan_cuts(x, kernel, padding, dilation, least_saved, hint=None):
    """((row cut, column cut), the cut map) of x for a stride-1 convolution, cutting the runs that save
    at least ``least_saved`` lines each: rows first, then columns of the row-cut map (they are the
    column runs of x too, since every line it dropped repeats one it kept).

    ``hint``: cuts planned the same way for an earlier input of x's shape (a layer's previous forward;
    FCN's runs come from its padding, so they are the same step after step). Where every run they
    name is a whole run of x as well (:func:`cut_map`: its lines equal, exactly, and the lines on
    either side not), they are x's cuts, without the search for candidates; where one is not, x is
    searched as without a hint. So the cuts are the search's, unless x has a run elsewhere that the
    hint does not name (its lines are then computed in full); every cut run is one of identical lines.
    """
    if hint is not None and tuple(cut.size for cut in hint) == tuple(x.shape[2:]):
        cut_x = cut_map(x, hint)
        if cut_x is not None:
            return hint, cut_x
    cuts, cut_x = [], x
    for axis, k, p, d in zip((2, 3), kernel, padding, dilation):
        span = d * (k - 1) + 1
        cut = LineCut(tuple(find_runs(cut_x, axis, span + least_saved)), span, p, x.shape[axis])
        if cut.runs:
            cut_x = take_lines(cut_x, axis, cut)
        cuts.append(cut)
    return tuple(cuts), cut_x


def whole_run(x, axis, a, b):
    """Lines a..b-1 of x are a run of identical lines that neither neighbouring line extends."""
    return (run_holds(x, axis, a, b) and (a == 0 or not run_holds(x, axis, a - 1, a + 1))
            and (b == x.shape[axis] or not run_holds(x, axis, b - 1, b + 1)))


def cut_map(x, cuts):
    """x with the runs of ``cuts`` cut (rows, then columns of the row-cut map), or None where one of
    those runs is not a whole run of identical lines in x (:func:`whole_run`)."""
    cut_x = x
    for axis, cut in zip((2, 3), cuts):
        if not all(whole_run(cut_x, axis, a, b) for a, b in cut.runs):
            return None
        if cut.runs:
            cut_x = take_lines(cut_x, axis, cut)
    return cut_x


def take_lines(x, axis, cut):
    """x with only the lines ``cut`` keeps along ``axis``: its blocks of consecutive lines, joined
    (along the last axis 3x faster than a gather of the indices)."""
    xp = get_array_module(x)
    return xp.concatenate([_lines(x, axis, a, b) for a, b, _, _ in cut.kept_ranges], axis=axis)


def put_lines(x_cut, cuts, shape):
    """A zero map of ``shape`` with the cut map's lines put back where they were kept: the adjoint
    of cutting (``take_lines`` along rows, then columns)."""
    xp = get_array_module(x_cut)
    x = xp.zeros(shape, dtype=x_cut.dtype)
    rows, cols = (cut.kept_ranges for cut in cuts)
    for r0, r1, s0, s1 in rows:            # a few blocks of consecutive lines (a fancy index is 4x slower)
        for c0, c1, t0, t1 in cols:
            x[:, :, r0:r1, c0:c1] = x_cut[:, :, s0:s1, t0:t1]
    return x


def expand_output(y_cut, cuts):
    """The full convolution's output from the cut one: each run's inner output line repeated.

    Columns first, on the cut rows only, then whole rows (each a contiguous copy, one source row
    repeated down a run): the full map is written once, and never with a repeated single column
    as the innermost loop.
    """
    xp = get_array_module(y_cut)
    rows, cols = (cut.segments for cut in cuts)
    wide = xp.empty((*y_cut.shape[:3], cuts[1].out_size), dtype=y_cut.dtype)
    for c0, c1, t0, t1 in cols:
        wide[:, :, :, c0:c1] = y_cut[:, :, :, t0:t1]                # a (..., 1) source is broadcast
    y = xp.empty((*y_cut.shape[:2], cuts[0].out_size, cuts[1].out_size), dtype=y_cut.dtype)
    for r0, r1, s0, s1 in rows:
        y[:, :, r0:r1] = wide[:, :, s0:s1]                          # a (1, ...) row is broadcast
    return y


def sum_into_cut(dy, cuts):
    """dy of the full output summed onto the cut output: each run's inner lines added into its one line.

    The adjoint of :func:`expand_output`: the weight gradient of the cut
    convolution with this dy is that of the full one.
    """
    xp = get_array_module(dy)
    for axis, cut in zip((2, 3), cuts):
        if not cut.runs:
            continue
        pieces = []
        for f0, f1, c0, c1 in cut.segments:
            part = _lines(dy, axis, f0, f1)
            pieces.append(part.sum(axis=axis, keepdims=True) if c1 - c0 < f1 - f0 else part)
        dy = xp.concatenate(pieces, axis=axis)
    return dy


def saved_fraction(cuts):
    """Share of the full output's pixels the cut convolution computes."""
    rows, cols = cuts
    return rows.cut_out_size * cols.cut_out_size / max(1, rows.out_size * cols.out_size)
