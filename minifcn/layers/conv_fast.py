"""The fast routes of convolution: the same three maps as :mod:`minifcn.layers.conv`, computed faster.

Each route is a named function registered with :func:`minifcn.routes.register`,
with the rule that says where it may run and the reason it is chosen there.
``minifcn.routes.select`` tries them in the order below and falls back to the
textbook route; ``MINIFCN_ROUTE=textbook`` turns them all off, and
``minifcn explain routes`` shows which one each layer takes. The tests check
every route against the textbook one on random geometries.

Every rule receives the *facts* of the convolution ``C`` being computed or
transposed: its :class:`~minifcn.layers.columns.Unfolding` ``u`` (input shape
and geometry) and its number of output channels ``cout``; an input gradient's
rule also ``up_to_runs``, whether the layer takes a gradient exact only up to
its input's runs of repeated lines (``Conv2d.input_grad_up_to_runs``).

Every op, first:
  ``padding-core``    most outputs see only padding (FCN's conv1_1, padded by 100): those are the bias
                      (forward) or contribute nothing (gradients); the rest is a convolution of the
                      core window with less padding, by the best route for it
Every op, next:
  ``repeated-lines``  stride 1, the input repeats a row or column many times (FCN's maps outside the image,
                      a fact of the data): the map with each run cut to the kernel's span; else the next route.
                      The input gradient only where the layer takes one up to those runs.
  ``channel-diagonal`` strided, the weight one kernel from each channel to itself and zeros between channels
                      (FCN's fixed bilinear upsampling, a fact of the data): the single-channel convolution
                      of the batch's N*C maps; else the next route. Forward and input gradient.
Convolution forward ``y = C x``:
  ``space-to-depth``  the stride divides the kernel and few output channels (FCN's upsampling, backwards)
  ``winograd``        3x3, stride 1, batches of 4 or more, 32 channels or more, maps up to 48 x 48: Winograd's
                      F(2x2, 3x3), 16 products of transformed 4x4 tiles (:mod:`minifcn.layers.winograd`)
  ``shifted``         stride 1, 4 to 16 channels in, at most 8 out: k*k products of shifted slices, no columns
  ``row-shifted``     stride 1, a large map, at most 32 out: columns along the width only (kw copies),
                      one product per kernel row on the same columns shifted by whole rows
  ``batch-folded``    two images or more, few positions an image, a large weight (fc6, fc7): one product
                      with the batch's columns side by side, the weight read once
  ``bands``           im2col and the product band by band of output rows, bands shared by CPU threads;
                      in training, columns that are one band stay in a buffer of the layer's for its weight gradient
Input gradient ``dx = C^T dy`` (also the forward of a transposed convolution):
  ``batch-folded``    as the forward's: one product ``W^T dy`` over the whole batch, then col2im
  ``pointwise``       1x1, stride 1, no padding: one product, no col2im
  ``flipped-kernel``  stride 1: a convolution of dy with the flipped kernel
  ``sub-pixel``       the stride divides the kernel: a stride-1 convolution, then depth to space
  ``bands-col2im``    the product and col2im band by band of output rows
Weight gradient ``dW = dy . cols^T``:
  ``winograd``        where the forward's rule holds: its adjoint, on the forward's transformed tiles
  ``shifted``         stride 1, at most 8 channels in and 8 out: k*k products of shifted slices, no columns
  ``bands``           im2col band by band (or the forward's kept columns), per-thread partial sums, the
                      product in the faster orientation

Bias gradient ``db = sum of dy over the batch and the positions``:
  ``ones-product``    dy's rows times a vector of ones (a matrix-vector product, on every core)

Rules of thumb behind the thresholds are stated where they are used; the
measurements that led to them are in ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import functools

from ..backend import constant_array, get_array_module
from ..parallel import num_threads, run_bands, workers_for
from ..routes import ACROSS_CALLS, register, run
from ._checks import add_or_store, check_accumulate
from . import winograd
from .columns import BAND_BYTES, Unfolding, conv_output_size, workspace
from .line_runs import expand_output, plan_cuts, put_lines, saved_fraction, sum_into_cut

FORWARD, INPUT_GRAD, WEIGHT_GRAD = "conv_forward", "conv_input_grad", "conv_weight_grad"
BIAS_GRAD = "conv_bias_grad"

# Bytes of padded input (all images and channels) per band of the ``shifted``
# routes, by array module (0: one band). A band's k*k slices and its sums
# should stay in L2, not L3 as the columns of ``bands`` do.
SHIFTED_BAND_BYTES = {"numpy": 320 << 10, "cupy": 0}


FACTS_KEPT = 256  # geometries whose facts are remembered (a training run sees a few dozen)


def conv_facts(x_shape, weight_shape, stride, padding, dilation, out_hw=None):
    """The facts a convolution route's rule reads: (Unfolding of the input, output channels).

    They depend on the geometry alone, and a layer asks for them at every pass, so the same
    geometry gets the same (never modified) objects back, and what is derived from them once
    (:func:`padding_core`) is remembered with them: about 2 % of the README recipe's step (batch 1)
    went to building them again (benchmarks/RESULTS.md)."""
    return _facts_of(tuple(map(int, x_shape)), tuple(map(int, weight_shape)), tuple(stride), tuple(padding),
                     tuple(dilation), None if out_hw is None else tuple(map(int, out_hw)))


@functools.lru_cache(maxsize=FACTS_KEPT)
def _facts_of(x_shape, weight_shape, stride, padding, dilation, out_hw):
    return Unfolding(x_shape, weight_shape[2:], stride, padding, dilation, out_hw), weight_shape[0]


# --------------------------------------------------------------------------- outputs that see only padding
#
# Along one axis, output o reads padded positions o*s + i*d (i < k); the input
# sits at p .. p+H-1. Outputs before o0 = ceil((p - d(k-1)) / s) or from
# o1 = floor((p + H - 1) / s) + 1 on read zeros only: in the forward they are the
# bias, and in both gradients they contribute nothing. The outputs o0 .. o1-1
# are themselves a convolution of x with padding p - o0*s (and o1 - o0 outputs).
# FCN's conv1_1 (padding 100, 3x3) on a 128 x 128 image: 130 x 130 of its
# 326 x 326 outputs see the image.

CORE_MAX_FRACTION = 0.75  # the route pays where at most this share of the outputs sees the input


def _core_axis(size, kernel, stride, padding, dilation, out):
    """(o0, o1, reduced padding) of one axis, or None where the reduced convolution cannot express it."""
    o0 = max(0, -(-(padding - dilation * (kernel - 1)) // stride))
    o0 = min(o0, padding // stride)             # the reduced padding p - o0*s stays >= 0
    o1 = min(out, (padding + size - 1) // stride + 1)
    reduced = padding - o0 * stride
    if o1 <= o0 or conv_output_size(size, kernel, stride, reduced, dilation) < o1 - o0:
        return None
    return o0, o1, reduced


@functools.lru_cache(maxsize=FACTS_KEPT)  # u: the same object for the same geometry (conv_facts)
def padding_core(u):
    """``((r0, r1), (c0, c1), reduced padding)``: the window of outputs of ``u`` that see its input, or None."""
    axes = [_core_axis(size, k, s, p, d, out) for size, k, s, p, d, out in
            zip(u.x_shape[2:], u.kernel, u.stride, u.padding, u.dilation, u.out_hw)]
    if None in axes:
        return None
    (r0, r1, ph), (c0, c1, pw) = axes
    return (r0, r1), (c0, c1), (ph, pw)


def core_applies(u, cout=None, up_to_runs=False):
    """The outputs that see the input are at most ``CORE_MAX_FRACTION`` of all."""
    core = padding_core(u)
    if core is None:
        return False
    (r0, r1), (c0, c1), _ = core
    return (r1 - r0) * (c1 - c0) <= CORE_MAX_FRACTION * u.out_hw[0] * u.out_hw[1]


_CORE_REASON = "most outputs see only padding: the core window by the best route for it, with less padding"


@register(FORWARD, "padding-core", applies=core_applies, reason=_CORE_REASON + "; the rest is the bias")
def forward_on_core(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``C x (+ b)`` where most outputs read only zero padding: those are ``b`` (or 0), the core is computed.

    y[:, :, r0:r1, c0:c1] is the convolution of x with padding reduced by the
    core's offset (``padding_core``), by whichever route applies to that geometry.
    """
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    (r0, r1), (c0, c1), reduced = padding_core(u)
    y = xp.empty((x.shape[0], cout, *u.out_hw), dtype=x.dtype)
    y[...] = 0 if bias is None else bias.reshape(1, cout, 1, 1)
    geometry = (u.stride, reduced, u.dilation, (r1 - r0, c1 - c0))
    y[:, :, r0:r1, c0:c1] = run(FORWARD, conv_facts(x.shape, weight.shape, *geometry), x, weight, *geometry, bias=bias)
    return y


@register(INPUT_GRAD, "padding-core", applies=core_applies, reason=_CORE_REASON + "; the rest adds nothing")
def input_grad_on_core(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy`` where most of dy sits on outputs that read only padding: only the core of dy reaches x."""
    xp = get_array_module(dy)
    u, _ = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    (r0, r1), (c0, c1), reduced = padding_core(u)
    core = xp.ascontiguousarray(dy[:, :, r0:r1, c0:c1])
    geometry = (u.stride, reduced, u.dilation)
    return run(INPUT_GRAD, conv_facts(x_shape, weight.shape, *geometry, core.shape[2:]),
               core, weight, x_shape, *geometry)


@register(WEIGHT_GRAD, "padding-core", applies=core_applies, reason=_CORE_REASON + "; the rest adds nothing")
def weight_grad_on_core(dy, x, weight_shape, stride, padding, dilation, accumulate=None, overwrite=False):
    """``dW += dy . cols^T`` where most columns are all zero padding: only the core of dy counts."""
    xp = get_array_module(dy)
    u, _ = conv_facts(x.shape, weight_shape, stride, padding, dilation, dy.shape[2:])
    (r0, r1), (c0, c1), reduced = padding_core(u)
    core = xp.ascontiguousarray(dy[:, :, r0:r1, c0:c1])
    geometry = (u.stride, reduced, u.dilation)
    return run(WEIGHT_GRAD, conv_facts(x.shape, weight_shape, *geometry, core.shape[2:]),
               core, x, weight_shape, *geometry, accumulate=accumulate, overwrite=overwrite)


# --------------------------------------------------------------------------- runs of identical lines
#
# After conv1_1's padding of 100, the maps of conv1_2 to conv3 repeat one row
# (and one column) over most of their extent, outside the image's footprint
# (:mod:`minifcn.layers.line_runs`). Where the input has such runs, the forward
# and the weight gradient run on the map with each run cut to the kernel's
# span. The exact input gradient cannot (dy does not repeat), but one exact up
# to the runs can, where the layer asks for no more (``up_to_runs``, see
# line_runs). The runs are a fact of the data, not of the geometry: the rule
# only says where they are looked for, and a map without enough of them goes to
# the next route (``skip=``); the input gradients' own convolutions of dy do not
# search it.

# Rules (figures in benchmarks/RESULTS.md, "repeated lines"): the search, the
# gathers and the expansion cost a few passes over the map, so the route pays
# where the cut convolution has at most half the outputs on maps of 48 x 48 or
# more (conv1_2 to conv3_3 of the small FCN); on conv4's 37 x 37 maps it lost.
RUNS_LEAST_SAVED = 4        # a run is cut only where that drops at least this many lines
RUNS_MAX_FRACTION = 0.5     # and only if the cut convolution then computes at most this share of the outputs
RUNS_LEAST_OUTPUTS = 48 * 48  # smaller outputs are not searched


def runs_applies(u, cout=None):
    """Stride 1, the natural output size, at least ``RUNS_LEAST_OUTPUTS`` outputs."""
    natural = tuple(conv_output_size(size, k, 1, p, d) for size, k, p, d in
                    zip(u.x_shape[2:], u.kernel, u.padding, u.dilation))
    return u.stride == (1, 1) and u.out_hw == natural and u.out_hw[0] * u.out_hw[1] >= RUNS_LEAST_OUTPUTS


_RUNS = "repeated-lines"
_RUNS_REASON = "stride 1, runs of identical rows or columns in x (FCN, outside the image): runs cut to the kernel"


def _plan_key(u):
    return (_RUNS, u.x_shape, u.kernel, u.padding, u.dilation, RUNS_LEAST_SAVED, RUNS_MAX_FRACTION)


RUNS_HINTS_KEPT = 8  # a layer keeps the cuts of its inputs of at most this many shapes (the latest)


def _cuts_worth_it(x, u, memo=None):
    """(cuts, cut map) of x, or None where they would not save enough. With a layer's ``memo``, the
    forward's answer is kept there and the weight gradient of the same input reads it back; the cuts
    that paid are also kept in ``memo[ACROSS_CALLS]`` (if the layer keeps one), the hint for its next
    input of this shape (:func:`~minifcn.layers.line_runs.plan_cuts` checks it against the data)."""
    key = _plan_key(u)
    if memo is not None and key in memo:
        return memo[key]
    kept = None if memo is None else memo.get(ACROSS_CALLS)
    hint = None if kept is None else kept.pop(key, None)
    cuts, cut_x = plan_cuts(x, u.kernel, u.padding, u.dilation, RUNS_LEAST_SAVED, hint=hint)
    planned = (cuts, cut_x) if saved_fraction(cuts) <= RUNS_MAX_FRACTION else None
    if memo is not None:
        memo[key] = planned
    if kept is not None and planned is not None:
        kept[key] = cuts                         # now the latest shape
        hints = [k for k in kept if k[0] == _RUNS]
        for old in hints[:max(0, len(hints) - RUNS_HINTS_KEPT)]:
            del kept[old]                        # the shapes seen longest ago
    return planned


@register(FORWARD, _RUNS, applies=runs_applies, reason=_RUNS_REASON + ", their output repeated",
          data_dependent=True)
def forward_on_cut_runs(x, weight, stride, padding, dilation, out_hw=None, bias=None, memo=None):
    """``C x (+ b)`` at stride 1 where x repeats lines: the cut map's convolution, its run lines repeated.

    Inputs and returns as :func:`minifcn.layers.conv.conv2d_forward`. Along an
    axis where lines a..b-1 of x are equal and the kernel spans e lines, outputs
    o = a+p .. b+p-e read only those lines, so they are all equal::

        y[..., o, :] = y_cut[..., a'+p, :]   for every such o   (a' = where the run starts in the cut map)

    and every other output reads the same lines in x and in the cut map. Without
    enough runs in x, the next route computes it whole. ``memo``: see :func:`_cuts_worth_it`.
    """
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    planned = _cuts_worth_it(x, u, memo)
    if planned is None:
        return run(FORWARD, (u, cout), x, weight, stride, padding, dilation, out_hw, bias=bias, skip=(_RUNS,),
                   memo=memo)
    cuts, cut_x = planned
    geometry = (u.stride, u.padding, u.dilation)
    y_cut = run(FORWARD, conv_facts(cut_x.shape, weight.shape, *geometry), cut_x, weight, *geometry,
                bias=bias, skip=(_RUNS,), memo=memo)
    return expand_output(y_cut, cuts)


@register(WEIGHT_GRAD, _RUNS, applies=runs_applies, reason=_RUNS_REASON + ", dy summed over them",
          data_dependent=True)
def weight_grad_on_cut_runs(dy, x, weight_shape, stride, padding, dilation, accumulate=None, overwrite=False,
                            memo=None):
    """``dW += dy . cols^T`` at stride 1 where x repeats lines. The outputs o of a run (as in
    :func:`forward_on_cut_runs`) all have the column of the cut map's one output a'+p, so::

        sum_o dy[o] cols[o]^T = (sum_o dy[o]) cols_cut[a'+p]^T

    the weight gradient of the cut map with dy summed onto it (``sum_into_cut``). Else the next route.
    ``memo``: the forward's, where it found the runs (:func:`_cuts_worth_it`)."""
    u, cout = conv_facts(x.shape, weight_shape, stride, padding, dilation, dy.shape[2:])
    planned = _cuts_worth_it(x, u, memo)
    if planned is None:
        return run(WEIGHT_GRAD, (u, cout), dy, x, weight_shape, stride, padding, dilation,
                   accumulate=accumulate, overwrite=overwrite, skip=(_RUNS,), memo=memo)
    cuts, cut_x = planned
    dy_cut = _summed_onto_cut(dy, cuts, memo)
    geometry = (u.stride, u.padding, u.dilation)
    return run(WEIGHT_GRAD, conv_facts(cut_x.shape, weight_shape, *geometry, dy_cut.shape[2:]),
               dy_cut, cut_x, weight_shape, *geometry, accumulate=accumulate, overwrite=overwrite, skip=(_RUNS,),
               memo=memo)


def _summed_onto_cut(dy, cuts, memo):
    """``sum_into_cut(dy, cuts)``, computed once per dy: the weight and input gradients share it (memo)."""
    if memo is not None and memo.get(_DY_CUT, (None,))[0] is dy:
        return memo[_DY_CUT][1]
    dy_cut = sum_into_cut(dy, cuts)
    if memo is not None:
        memo[_DY_CUT] = (dy, dy_cut)
    return dy_cut


_DY_CUT = (_RUNS, "dy summed onto the cut output")


@register(INPUT_GRAD, _RUNS, applies=lambda u, cout, up_to_runs=False: up_to_runs and runs_applies(u),
          data_dependent=True,
          reason=_RUNS_REASON + ": the cut map's input gradient, exact up to the runs (the layer takes no more)")
def input_grad_up_to_runs(dy, weight, x_shape, stride, padding, dilation, memo=None):
    """A ``dx`` exact up to the runs of the forward's input, where the layer takes one (``up_to_runs``).

    With the forward ``y = E C_cut T x`` (T keeps the cut map's lines, C_cut is
    the convolution of the cut map, E repeats each run's output line), every
    change v of x that keeps its runs has ``C v = E C_cut T v``, so::

        <dy, C v> = <T^T C_cut^T E^T dy, v>

    ``E^T dy`` is dy summed onto the cut output (as in the weight gradient),
    ``C_cut^T`` the cut map's input gradient (any route), ``T^T`` puts it back
    on the kept lines, zeros elsewhere (``put_lines``). The result is not
    ``C^T dy``, but it has the same sums over each run and gives the same
    inner product with every such v: all a layer below needs for its parameter
    gradients when the runs stay for any parameters (FCN's padding,
    :mod:`minifcn.layers.line_runs`). It reads the runs from the forward's
    ``memo``; without them (or without a memo) the next route computes ``C^T dy``.
    """
    u, cout = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    key = _plan_key(u)
    planned = None if memo is None else memo.get(key)
    if planned is None:
        return run(INPUT_GRAD, (u, cout), dy, weight, x_shape, stride, padding, dilation, skip=(_RUNS,))
    cuts, cut_x = planned
    dy_cut = _summed_onto_cut(dy, cuts, memo)
    memo.pop(_DY_CUT, None)  # the layer's last use of it (its weight gradient comes first): not kept
    geometry = (u.stride, u.padding, u.dilation)
    dx_cut = run(INPUT_GRAD, conv_facts(cut_x.shape, weight.shape, *geometry, dy_cut.shape[2:]),
                 dy_cut, weight, cut_x.shape, *geometry)
    return put_lines(dx_cut, cuts, x_shape)


# --------------------------------------------------------------------------- one kernel on each channel alone
#
# FCN's fixed upsampling (upscore8, and every upsampling that is not learned) is bilinear_kernel(C, C, 2s):
# the same 2-D kernel from each channel to itself and zeros between channels, so its C x C products are
# mostly multiplications by zero. Where the weight has that form (a fact of the data, checked at every call),
# the convolution is the single-channel one of its diagonal kernel on the N*C maps of the batch.

_DIAGONAL = "channel-diagonal"
# Handing over: the routes before this one had their turn (padding-core's rule is the geometry's alone, and
# repeated-lines ran and handed over, or was skipped by the caller), so the next route is one after it.
_AFTER_DIAGONAL = (_RUNS, _DIAGONAL)
_DIAGONAL_REASON = "the same kernel on each channel and zeros between channels (FCN's fixed bilinear upsampling)"


def diagonal_applies(u, cout, up_to_runs=False):
    """A stride above 1 (FCN's upsampling: kernel 2s, stride s; not the stride-1 layers, where a learned
    weight would only be checked in vain) and as many channels in as out, two or more."""
    return u.stride != (1, 1) and u.x_shape[1] == cout >= 2


def one_kernel_per_channel(weight):
    """The (1, 1, kh, kw) kernel where ``weight[o, c]`` is it for o == c and zero otherwise, else None."""
    xp = get_array_module(weight)
    c, kernel = weight.shape[0], weight[:1, :1]
    if weight.shape[1] != c or c < 2 or bool(weight[1, 0].any()):  # a learned weight fails here, at once
        return None
    if not bool(xp.array_equal(weight, xp.eye(c, dtype=weight.dtype)[:, :, None, None] * kernel)):
        return None
    return kernel


@register(FORWARD, _DIAGONAL, applies=diagonal_applies, data_dependent=True,
          reason=_DIAGONAL_REASON + ": one single-channel convolution of the N*C maps")
def forward_channel_by_channel(x, weight, stride, padding, dilation, out_hw=None, bias=None, memo=None):
    """``y[n, c] = k * x[n, c] (+ b[c])`` where ``weight`` is ``k`` on its channel diagonal and zero elsewhere
    (:func:`one_kernel_per_channel`); else the next route."""
    kernel = one_kernel_per_channel(weight)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    if kernel is None:
        return run(FORWARD, (u, cout), x, weight, stride, padding, dilation, out_hw, bias, skip=_AFTER_DIAGONAL,
                   memo=memo)
    n, c, h, w = x.shape
    maps = x.reshape(n * c, 1, h, w)
    y = run(FORWARD, conv_facts(maps.shape, kernel.shape, stride, padding, dilation, u.out_hw), maps, kernel,
            stride, padding, dilation, u.out_hw).reshape(n, c, *u.out_hw)
    if bias is not None:
        y += bias.reshape(1, c, 1, 1)
    return y


@register(INPUT_GRAD, _DIAGONAL, applies=diagonal_applies, data_dependent=True,
          reason=_DIAGONAL_REASON + ": one single-channel transposed convolution of the N*C maps")
def input_grad_channel_by_channel(dy, weight, x_shape, stride, padding, dilation, memo=None):
    """``dx[n, c] = k^T dy[n, c]`` where ``weight`` is ``k`` on its channel diagonal and zero elsewhere; else
    the next route. (The forward of FCN's fixed upsampling.)"""
    kernel = one_kernel_per_channel(weight)
    n, c, h, w = x_shape
    if kernel is None:
        u, cout = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
        return run(INPUT_GRAD, (u, cout, False), dy, weight, x_shape, stride, padding, dilation,
                   skip=_AFTER_DIAGONAL, memo=memo)
    maps = dy.reshape(n * c, 1, *dy.shape[2:])
    return run(INPUT_GRAD, conv_facts((n * c, 1, h, w), kernel.shape, stride, padding, dilation, maps.shape[2:]),
               maps, kernel, (n * c, 1, h, w), stride, padding, dilation).reshape(x_shape)


# --------------------------------------------------------------------------- forward: y = C x

@register(FORWARD, "space-to-depth",
          applies=lambda u, cout: u.blocked and cout < u.x_shape[1] * u.stride[0] * u.stride[1],
          reason="stride divides kernel, Cout < Cin*s*s: space to depth, one product, m*m shifted sums")
def forward_by_blocks(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``C x`` when the stride divides the kernel (``k = m*s``, dilation 1), without im2col.

    Cut the padded input into s x s blocks and stack each block's pixels as
    channels (space to depth): ``S[n, (c, r, t), P, Q] = xpad[n, c, P*s + r, Q*s + t]``.
    Kernel offset ``(a*s + r, e*s + t)`` of output pixel (P, Q) reads pixel
    (r, t) of block (P + a, Q + e), so::

        y[n, o, P, Q] = sum_{a, e < m} Z[n, (a, e, o), P + a, Q + e]
        Z = W_blocks @ S,   W_blocks[(a, e, o), (c, r, t)] = W[o, c, a*s + r, e*s + t]

    one product for every block and offset, then m*m shifted sums of small
    arrays. Columns would hold ``Cin*s*s*m*m`` numbers per output pixel, Z
    only ``m*m*Cout``: for upscore8's backward (21 -> 21 channels, s = 8)
    that is 5376 against 84. The adjoint of :func:`input_grad_by_blocks`.
    """
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    n, cin = u.x_shape[:2]
    (kh, kw), (sh, sw) = weight.shape[2:], u.stride
    mh, mw = kh // sh, kw // sw
    oh, ow = u.out_hw
    blocks = u.blocks(u.pad(x))                                  # (N, Cin, HS, s, WS, s)
    hs, ws = blocks.shape[2], blocks.shape[4]                    # HS >= OH + m - 1
    s2d = xp.ascontiguousarray(blocks.transpose(0, 1, 3, 5, 2, 4)).reshape(n, cin * sh * sw, hs * ws)
    w_blocks = xp.ascontiguousarray(
        weight.reshape(cout, cin, mh, sh, mw, sw).transpose(2, 4, 0, 1, 3, 5)).reshape(mh * mw * cout, -1)
    z = xp.matmul(w_blocks, s2d).reshape(n, mh, mw, cout, hs, ws)
    y = z[:, 0, 0, :, :oh, :ow].copy()
    for a in range(mh):
        for e in range(mw):
            if a or e:
                y += z[:, a, e, :, a:a + oh, e:e + ow]
    if bias is not None:
        y += bias.reshape(1, cout, 1, 1)
    return y


# --------------------------------------------------------------------------- Winograd F(2x2, 3x3) (3x3, stride 1)
#
# The maths is in :mod:`minifcn.layers.winograd`. Bands are images (of a batch)
# or tile rows (of one image), one per CPU thread, each taken from its gather to
# its output by one thread at one BLAS thread. In training the forward's V (16
# values a tile and input channel: 4/9 of im2col's columns) stays in a buffer of
# the layer's for the weight gradient (without it the small case's step gained
# less than half as much). Rule (benchmarks/RESULTS.md, "Winograd"): measured on the Zen 2,
# it paid in batches, on 32 and 64 channels, on maps up to 37 x 37; at batch 1
# the recipe's step was 7 to 13 % slower with it, though its layers alone were faster.

WINOGRAD_LEAST_BATCH = 4         # fewer images: slower in a step (one image), mixed alone (two: 0.81 to 1.21)
WINOGRAD_LEAST_CHANNELS = 32     # fewer channels in or out: the transforms cost more than the products save
WINOGRAD_MOST_OUTPUTS = 48 * 48  # larger maps: the small step no faster without the limit (0.942 against 0.932)
WINOGRAD_MIN_BAND_BYTES = 256 << 10  # less V than this a thread: fewer bands
WINOGRAD_KEEP_BYTES = 64 << 20       # a layer keeps at most this much V for its weight gradient (else recomputed)
_WINO_KEPT = ("winograd", "the forward's tiles")        # memo: (x, its unfolding's key, bands, V of each band)
_WINO_BUFFER = ("winograd", "buffer of the tiles")      # memo[ACROSS_CALLS]: the layer's flat buffer


def winograd_applies(u, cout, up_to_runs=False):
    """3x3, stride 1, dilation 1, a batch of ``WINOGRAD_LEAST_BATCH`` or more, at least
    ``WINOGRAD_LEAST_CHANNELS`` channels in and out, at most ``WINOGRAD_MOST_OUTPUTS`` outputs a map."""
    return (u.kernel == (3, 3) and u.stride == (1, 1) and u.dilation == (1, 1)
            and u.x_shape[0] >= WINOGRAD_LEAST_BATCH and min(u.x_shape[1], cout) >= WINOGRAD_LEAST_CHANNELS
            and u.out_hw[0] * u.out_hw[1] <= WINOGRAD_MOST_OUTPUTS)


def _winograd_bands(xp, tiling, cin, itemsize):
    """One band per CPU thread, each with at least ``WINOGRAD_MIN_BAND_BYTES`` of V (NumPy; CuPy: one band)."""
    if xp.__name__ != "numpy":
        return tiling.bands(1)
    whole = 16 * cin * tiling.tiles * itemsize
    most = tiling.x_shape[0] if tiling.x_shape[0] > 1 else tiling.tiles_hw[0]
    return tiling.bands(min(num_threads(), most, max(1, whole // WINOGRAD_MIN_BAND_BYTES)))


def _winograd_tiles_to_keep(memo, xp, dtype, size):
    """The layer's flat buffer for the forward's V (``size`` values), or None where V is not kept
    (no weight gradient follows, or V exceeds ``WINOGRAD_KEEP_BYTES``)."""
    if memo is None or not memo.get(KEEP_COLUMNS) or ACROSS_CALLS not in memo:
        return None
    if size * dtype.itemsize > WINOGRAD_KEEP_BYTES:
        return None
    kept = memo[ACROSS_CALLS]
    buf = kept.get(_WINO_BUFFER)
    if buf is None or buf.size < size or buf.dtype != dtype or get_array_module(buf) is not xp:
        buf = kept[_WINO_BUFFER] = xp.empty(size, dtype=dtype)
    return buf[:size]


def _band_tiles(buffer, tiling, band, cin, xp, dtype):
    """Where a band's V goes: its slice of the kept buffer, or this thread's scratch."""
    c0, c1 = tiling.columns(band)
    if buffer is None:
        return workspace(xp, dtype, (16, cin, c1 - c0), "winograd tiles")
    return buffer[16 * cin * c0:16 * cin * c1].reshape(16, cin, c1 - c0)


def _run_winograd_bands(bands, one_band):
    """``one_band(index)`` for every band, band b on thread b % threads."""
    run_bands([(i,) for i in range(len(bands))], lambda worker, i: one_band(i), min(num_threads(), len(bands)))


@register(FORWARD, "winograd", applies=winograd_applies, uses_memo=True,
          reason=f"3x3, stride 1, batches of >= {WINOGRAD_LEAST_BATCH}, >= {WINOGRAD_LEAST_CHANNELS} channels "
                 f"in and out, <= {WINOGRAD_MOST_OUTPUTS} outputs a map: Winograd F(2x2, 3x3), 16 products of "
                 "transformed 4x4 tiles, 4 multiplications an output instead of 9")
def forward_by_winograd(x, weight, stride, padding, dilation, out_hw=None, bias=None, memo=None):
    """``C x (+ b)`` for a 3x3 kernel at stride 1 by Winograd's F(2x2, 3x3), band by band.

    Inputs and returns as :func:`minifcn.layers.conv.conv2d_forward`. Per band:
    V = (Bt kron Bt) d of its 4x4 input tiles, M[k] = U[k] V[k] for the 16
    positions k of a transformed tile, y = (At kron At) M (:mod:`.winograd`).
    ``memo``: a layer's; where it asks for them, V of every band stays in its buffer.
    """
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    cin = x.shape[1]
    tiling = winograd.Tiling(x.shape, u.padding, u.out_hw)
    halves = tiling.split_padded(x)
    kernels = winograd.transformed_kernels(weight)
    y = xp.empty((x.shape[0], cout) + u.out_hw, dtype=x.dtype)
    bands = _winograd_bands(xp, tiling, cin, x.itemsize)
    kept = _winograd_tiles_to_keep(memo, xp, x.dtype, 16 * cin * tiling.tiles)
    tiles = [None] * len(bands)

    def one_band(index):
        band = bands[index]
        v = winograd.input_tiles(tiling, halves, band, _band_tiles(kept, tiling, band, cin, xp, x.dtype))
        winograd.forward_band(tiling, kernels, v, band, y, bias)
        tiles[index] = v

    _run_winograd_bands(bands, one_band)
    if kept is not None:
        memo[_WINO_KEPT] = (x, _unfolding_key(u), bands, tiles)
    return y


# --------------------------------------------------------------------------- shifted products (stride 1)
#
# At stride 1, output pixel (p, q) reads padded pixels (p + i*dh, q + j*dw).
# Computed on the padded width Wp (the last OW..Wp-1 columns of each output row
# are junk, never kept), the pixels kernel offset (i, j) reads for output rows
# r0..r1 are ONE contiguous slice of the flattened padded input:
#     xflat[n, c, r0*Wp + off : r1*Wp + off],   off = i*dh*Wp + j*dw
# so a convolution is k*k products of (Cout, Cin) matrices with such slices,
# and no column buffer (Cin*kh*kw times the input) is ever written. Rule
# (figures in benchmarks/RESULTS.md, "shifted products"): it wins where the
# products are skinny: at most 8 output channels (conv1_2 of the small FCN, and
# the 16 -> 8 flipped convolution of conv2_1's input gradient). With 3 input
# channels (conv1_1) the forward's k*k products are too thin; with 16 output
# channels (conv2_1) the columns' one product is the faster.

# In a batch of at least SHIFTED_BATCH images the products are made per image
# and the bands shared by the CPU threads; there the shifted products also beat
# the columns up to 64 channels in and out, where Cout <= 2 Cin (every 3 x 3
# layer of the small FCN but conv1_1, at batch 8). With fewer channels in than
# that (3 -> 64, 8 -> 64) each product is too thin and the columns win, by up to
# 9x. RESULTS.md, "shifted products in batches"; measured on an Intel Xeon.
SHIFTED_BATCH = 8
SHIFTED_BATCH_MOST_CHANNELS = 64


def shifted_applies(u, cout, most_in, most_out, least_in=1):
    """Stride 1, a kernel larger than 1x1, ``least_in <= Cin``, and either ``Cin <= most_in`` and
    ``Cout <= most_out``, or a batch of ``SHIFTED_BATCH`` images or more with at most
    ``SHIFTED_BATCH_MOST_CHANNELS`` channels in and out and ``Cout <= 2 Cin``."""
    n, cin = u.x_shape[:2]
    if u.stride != (1, 1) or u.kernel == (1, 1) or cin < least_in:
        return False
    if cin <= most_in and cout <= most_out:
        return True
    return n >= SHIFTED_BATCH and max(cin, cout) <= SHIFTED_BATCH_MOST_CHANNELS and cout <= 2 * cin


def _flat_padded(x, u):
    """x zero-padded and flattened: (N, C, Hp*Wp + dw*(kw-1)), and Wp. The zero tail
    lets the last kernel offset's slice run to the end of the last (junk) columns."""
    xp = get_array_module(x)
    n, c, h, w = x.shape
    (ph, pw), (hp, wp) = u.padding, (h + 2 * u.padding[0], w + 2 * u.padding[1])
    flat = xp.zeros((n, c, hp * wp + u.dilation[1] * (u.kernel[1] - 1)), dtype=x.dtype)
    flat[:, :, :hp * wp].reshape(n, c, hp, wp)[:, :, ph:ph + h, pw:pw + w] = x
    return flat, wp


def _taps(u, wp):
    """(i, j, off) for every kernel offset: its slice starts ``off`` after the band's first padded pixel."""
    (kh, kw), (dh, dw) = u.kernel, u.dilation
    return [(i, j, i * dh * wp + j * dw) for i in range(kh) for j in range(kw)]


def _shifted_bands(u, xp, itemsize, wp):
    """Bands (r0, r1) of output rows with about ``SHIFTED_BAND_BYTES`` of padded input each."""
    n, c = u.x_shape[:2]
    oh = u.out_hw[0]
    budget = SHIFTED_BAND_BYTES.get(xp.__name__, 0)
    step = oh if budget <= 0 else max(1, budget // (n * c * wp * itemsize))
    return [(r0, min(oh, r0 + step)) for r0 in range(0, oh, step)]


@register(FORWARD, "shifted", applies=lambda u, cout: shifted_applies(u, cout, 16, 8, least_in=4),
          reason=f"stride 1, 4-16 channels in and <= 8 out (in batches of {SHIFTED_BATCH} or more: "
                 f"<= {SHIFTED_BATCH_MOST_CHANNELS}, Cout <= 2 Cin): "
                 "k*k products of contiguous shifted slices on the padded width, no columns")
def forward_by_shifted_products(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``C x (+ b)`` at stride 1 as a sum of k*k products of shifted slices, band by band of output rows.

    Inputs: x (N, Cin, H, W), weight (Cout, Cin, kh, kw), stride (1, 1), padding and
    dilation pairs, out_hw an optional (OH, OW) at most the natural size, bias (Cout,).
    Returns: y (N, Cout, OH, OW). With ``xflat`` the padded input flattened to
    (N, Cin, Hp*Wp + tail) and the output computed on the padded width Wp::

        ywide[n, :, l] = sum_{i,j} W[:, :, i, j] @ xflat[n, :, l + i*dh*Wp + j*dw],   l = p*Wp + q

    and ``y[n, o, p, q] = ywide[n, o, p*Wp + q]`` for q < OW (+ b[o]). Each band of
    rows is summed in this thread's scratch buffer, then copied out while in cache.
    """
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    n = x.shape[0]
    oh, ow = u.out_hw
    xflat, wp = _flat_padded(x, u)
    taps = [(xp.ascontiguousarray(weight[:, :, i, j]), off) for i, j, off in _taps(u, wp)]  # (Cout, Cin) each
    y = xp.empty((n, cout, oh, ow), dtype=x.dtype)

    def one_band(worker, r0, r1):
        length = (r1 - r0) * wp
        wide = workspace(xp, x.dtype, (n, cout, length), "shifted sum")
        term = workspace(xp, x.dtype, (n, cout, length), "shifted term")
        for t, (w_ij, off) in enumerate(taps):
            src = xflat[:, :, r0 * wp + off:r0 * wp + off + length]   # (N, Cin, band * Wp), contiguous rows
            xp.matmul(w_ij, src, out=wide if t == 0 else term)
            if t:
                wide += term
        band = y[:, :, r0:r1]
        band[...] = wide.reshape(n, cout, r1 - r0, wp)[:, :, :, :ow]  # the junk columns stay behind
        if bias is not None:
            band += bias.reshape(cout, 1, 1)

    bands = _shifted_bands(u, xp, x.itemsize, wp)
    run_bands(bands, one_band, workers_for(xp, len(bands), n))
    return y


# --------------------------------------------------------------------------- row-shifted products (stride 1)
#
# Between the k*k shifted slices and the full im2col: unfold along the width
# only. With the padded input flattened on its padded width Wp (as above),
#     wcols[n, (c, j), l] = xflat[n, c, l + j*dw]          (kw copies of x, not kh*kw)
# and kernel row i of the output pixel l = p*Wp + q reads wcols[n, :, l + i*dh*Wp]:
# the same buffer shifted by whole padded rows. So
#     ywide[n, :, l] = sum_i W[:, :, i, :] @ wcols[n, :, l + i*dh*Wp]
# kh products of depth Cin*kw (deep enough for BLAS), on columns a third the
# size of im2col's for 3x3 kernels; the junk columns q >= OW are dropped as in
# ``shifted``. Rule (benchmarks/RESULTS.md, "row-shifted"): it beats im2col in
# bands on large maps with few output channels (the small FCN's 74 x 74 and
# 147 x 147 maps, many of them the input gradients' convolutions of dy); on
# 37 x 37 maps, with 64 channels, and as a weight gradient it did not.

ROW_SHIFTED_BAND_BYTES = {"numpy": 0, "cupy": 0}  # bytes of wcols per band (0: one band)
ROW_SHIFTED_MOST_OUT = 32            # more output channels: the one product of im2col is the faster
ROW_SHIFTED_LEAST_OUTPUTS = 60 * 60  # smaller maps: the extra products and adds cost more than they save


def row_shifted_applies(u, cout):
    """Stride 1, a kernel more than one row high, at most ``ROW_SHIFTED_MOST_OUT`` output channels and
    ``ROW_SHIFTED_LEAST_OUTPUTS`` outputs or more."""
    return (u.stride == (1, 1) and u.kernel[0] > 1 and cout <= ROW_SHIFTED_MOST_OUT
            and u.out_hw[0] * u.out_hw[1] >= ROW_SHIFTED_LEAST_OUTPUTS)


def _row_shifted_bands(u, xp, itemsize, wp):
    """Bands (r0, r1) of output rows with about ``ROW_SHIFTED_BAND_BYTES`` of wcols each."""
    n, c = u.x_shape[:2]
    oh = u.out_hw[0]
    budget = ROW_SHIFTED_BAND_BYTES.get(xp.__name__, 0)
    step = oh if budget <= 0 else max(1, budget // (n * c * u.kernel[1] * wp * itemsize))
    return [(r0, min(oh, r0 + step)) for r0 in range(0, oh, step)]


def _width_columns(xflat, u, wp, r0, r1, xp):
    """wcols of output rows r0..r1: (N, Cin*kw, (r1 - r0 + dh*(kh-1)) * Wp), this thread's scratch."""
    n, c = xflat.shape[:2]
    (kh, kw), (dh, dw) = u.kernel, u.dilation
    span = (r1 - r0 + dh * (kh - 1)) * wp
    wcols = workspace(xp, xflat.dtype, (n, c, kw, span), "width columns")
    for j in range(kw):
        start = r0 * wp + j * dw
        wcols[:, :, j] = xflat[:, :, start:start + span]
    return wcols.reshape(n, c * kw, span)


@register(FORWARD, "row-shifted", applies=row_shifted_applies,
          reason="stride 1, a large map, <= 32 out: columns along the width only, one product per kernel row")
def forward_by_row_shifts(x, weight, stride, padding, dilation, out_hw=None, bias=None):
    """``C x (+ b)`` at stride 1 from width columns and kh row-shifted products, band by band of output rows.

    Inputs and returns as :func:`minifcn.layers.conv.conv2d_forward`. For each
    band: wcols (above), then ``ywide = sum_i W[:, :, i, :] @ wcols[:, :, i*dh*Wp:]``
    summed in this thread's scratch buffer, and the valid columns copied out (+ b).
    """
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    n, cin = x.shape[:2]
    (oh, ow), (kh, kw), dh = u.out_hw, u.kernel, u.dilation[0]
    xflat, wp = _flat_padded(x, u)
    rows = [xp.ascontiguousarray(weight[:, :, i, :]).reshape(cout, cin * kw) for i in range(kh)]
    y = xp.empty((n, cout, oh, ow), dtype=x.dtype)

    def one_band(worker, r0, r1):
        length = (r1 - r0) * wp
        wcols = _width_columns(xflat, u, wp, r0, r1, xp)
        wide = workspace(xp, x.dtype, (n, cout, length), "row-shifted sum")
        term = workspace(xp, x.dtype, (n, cout, length), "row-shifted term")
        for i, w_i in enumerate(rows):
            src = wcols[:, :, i * dh * wp:i * dh * wp + length]      # rows of wcols, shifted by i*dh rows
            xp.matmul(w_i, src, out=wide if i == 0 else term)
            if i:
                wide += term
        band = y[:, :, r0:r1]
        band[...] = wide.reshape(n, cout, r1 - r0, wp)[:, :, :, :ow]
        if bias is not None:
            band += bias.reshape(cout, 1, 1)

    bands = _row_shifted_bands(u, xp, x.itemsize, wp)
    run_bands(bands, one_band, workers_for(xp, len(bands), n))
    return y


# A training step unfolds each input twice: the forward's product needs im2col(x), and so does the
# weight gradient's. Where the columns are one band (at most BAND_BYTES: the small FCN's conv2 to fc6 at
# batch 1), the bands forward writes them into a buffer of the layer's own (memo[ACROSS_CALLS], reused
# step after step, not a fresh array each time) and leaves them in the memo; the bands weight gradient of
# the same x multiplies them instead of unfolding x again. Only where the layer says a weight gradient
# follows (memo[KEEP_COLUMNS]: training, weight trainable).
KEEP_COLUMNS = "keep the forward's columns"     # set by the layer in its memo
_KEPT = ("bands", "the forward's columns")       # memo: (x, its unfolding's key, the columns)
_KEPT_BUFFER = ("bands", "buffer of the columns")  # memo[ACROSS_CALLS]: the layer's flat buffer


def _unfolding_key(u):
    return (u.x_shape, u.kernel, u.stride, u.padding, u.dilation, u.out_hw)


def _buffer_to_keep(memo, u, xp, dtype):
    """The layer's buffer for the forward's columns of ``u`` (one band), or None where they are not kept."""
    if memo is None or not memo.get(KEEP_COLUMNS) or ACROSS_CALLS not in memo:
        return None
    shape = u.band_shape(0, u.out_hw[0])
    size = shape[0] * shape[1] * shape[2]
    if size * dtype.itemsize > BAND_BYTES.get(xp.__name__, 0):
        return None
    kept = memo[ACROSS_CALLS]
    buf = kept.get(_KEPT_BUFFER)
    if buf is None or buf.size < size or buf.dtype != dtype or get_array_module(buf) is not xp:
        buf = kept[_KEPT_BUFFER] = xp.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


FOLD_MOST_POSITIONS = 64           # output positions an image at most: thin products, one per image
FOLD_LEAST_WEIGHT = 64 << 10       # and a weight of at least this many elements (256 KiB in float32, half an L2)


def batch_folded_applies(u, cout, up_to_runs=False):
    """Two images or more, at most ``FOLD_MOST_POSITIONS`` output positions each, and a weight of at least
    ``FOLD_LEAST_WEIGHT`` elements: FCN's fc6 (4096 x 512 x 7 x 7 in the paper) and fc7 on small maps."""
    return (u.x_shape[0] >= 2 and u.out_hw[0] * u.out_hw[1] <= FOLD_MOST_POSITIONS
            and cout * u.rows >= FOLD_LEAST_WEIGHT)


_FOLDED_REASON = "few positions an image, a large weight (fc6, fc7): the batch folded into one product's columns"


@register(FORWARD, "batch-folded", applies=batch_folded_applies, uses_memo=True,
          reason=_FOLDED_REASON + ", so the weight is read once, not once an image")
def forward_batch_folded(x, weight, stride, padding, dilation, out_hw=None, bias=None, memo=None):
    """``C x (+ b)`` as one product ``W (Cout, K) @ cols (K, N*L)``: the batch's columns side by side.

    Per image the product would be ``(Cout, K) @ (K, L)`` with a handful of columns L (9 for fc6 on a
    9 x 9 map), each one reading the whole weight again from memory. The columns are copied into the
    (K, N*L) layout (small: L is small) and the output copied back to NCHW. ``memo``: as for ``bands``,
    the columns (N, K, L) stay in the layer's buffer for the weight gradient where it asks."""
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    n, (oh, ow) = x.shape[0], u.out_hw
    kept = None if u.pointwise else _buffer_to_keep(memo, u, xp, x.dtype)  # (1x1: the columns are x itself)
    cols = u.unfold(u.pad(x), 0, oh, kept if kept is not None else workspace(xp, x.dtype, u.band_shape(0, oh)))
    side_by_side = cols.transpose(1, 0, 2).reshape(u.rows, n * oh * ow)     # (K, N*L), a copy
    y2 = weight.reshape(cout, -1) @ side_by_side                             # (Cout, N*L)
    if bias is not None:
        y2 += bias.reshape(cout, 1)
    y = xp.ascontiguousarray(y2.reshape(cout, n, oh * ow).transpose(1, 0, 2))  # (N, Cout, L)
    if kept is not None:
        memo[_KEPT] = (x, _unfolding_key(u), kept)
    return y.reshape(n, cout, oh, ow)


@register(FORWARD, "bands", uses_memo=True,
          reason="im2col and one product per band of output rows (cache-sized bands when Cout <= 64, else "
                 "one), bands shared by CPU threads; one band's columns kept for the weight gradient")
def forward_by_bands(x, weight, stride, padding, dilation, out_hw=None, bias=None, memo=None):
    """``C x (+ b)``: for each band of output rows, im2col into this thread's scratch buffer, then one product.
    ``memo``: a layer's; where it asks for them, columns of one band go to its buffer and stay in it."""
    xp = get_array_module(x)
    u, cout = conv_facts(x.shape, weight.shape, stride, padding, dilation, out_hw)
    n = x.shape[0]
    oh, ow = u.out_hw
    w2 = weight.reshape(cout, -1)                          # (Cout, Cin*kh*kw)
    y = xp.empty((n, cout, oh, ow), dtype=x.dtype)
    y3 = y.reshape(n, cout, oh * ow)
    xpad = u.pad(x)
    bands = list(u.bands(xp, x.itemsize, cout))
    kept = _buffer_to_keep(memo, u, xp, x.dtype) if len(bands) == 1 and not u.pointwise else None

    def one_band(worker, r0, r1):
        out = kept if kept is not None else workspace(xp, x.dtype, u.band_shape(r0, r1))
        cols = u.unfold(xpad, r0, r1, out)
        band = y3[:, :, r0 * ow:r1 * ow]                   # output rows r0..r1 of every image, in place
        xp.matmul(w2, cols, out=band)
        if bias is not None:                               # added while the band is in cache
            band += bias.reshape(cout, 1)

    run_bands(bands, one_band, workers_for(xp, len(bands), n))
    if kept is not None:
        memo[_KEPT] = (x, _unfolding_key(u), kept)
    return y


# --------------------------------------------------------------------------- input gradient: dx = C^T dy

@register(INPUT_GRAD, "batch-folded", applies=batch_folded_applies,
          reason=_FOLDED_REASON + ": W^T dy once, then col2im")
def input_grad_batch_folded(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy`` as one product ``W^T (K, Cout) @ dy (Cout, N*L)``, then col2im of every image
    (no col2im for a 1x1 convolution: the columns are dx). The forward's ``batch-folded``, transposed."""
    xp = get_array_module(dy)
    u, cout = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    n, _, oh, ow = dy.shape
    side_by_side = dy.reshape(n, cout, oh * ow).transpose(1, 0, 2).reshape(cout, n * oh * ow)  # a copy
    dcols = (weight.reshape(cout, -1).T @ side_by_side).reshape(u.rows, n, oh * ow).transpose(1, 0, 2)
    if u.pointwise:
        return xp.ascontiguousarray(dcols).reshape(x_shape)
    gpad = u.zeros(xp, dy.dtype)
    u.fold(dcols, gpad, 0, oh)                                               # (N, K, L) views, no copy
    return u.crop(gpad)


@register(INPUT_GRAD, "pointwise", applies=lambda u, cout, up_to_runs=False: u.pointwise,
          reason="1x1, stride 1, no padding: dx = W^T dy, the columns are dx itself")
def input_grad_pointwise(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy`` of a 1x1 convolution: one product ``W^T dy`` and no col2im."""
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    return xp.matmul(weight.reshape(cout, -1).T, dy.reshape(n, cout, oh * ow)).reshape(x_shape)


def _full_padding(u):
    """Padding that turns a stride-1 convolution's output back into its input size: d(k-1) - p."""
    return tuple((k - 1) * d - p for k, d, p in zip(u.kernel, u.dilation, u.padding))


def flipped_kernel_applies(u, cout=None, up_to_runs=False):
    """Stride 1, dy reaches every input pixel (not past an output_padding), and
    the input has no more pixels than dy (not fc6's 7x7 on a small map, where
    the flipped convolution would multiply mostly padding)."""
    (h, w), (oh, ow) = u.x_shape[2:], u.out_hw
    full = _full_padding(u)
    return (u.stride == (1, 1) and min(full) >= 0
            and (oh + full[0] - u.padding[0], ow + full[1] - u.padding[1]) == (h, w) and h * w <= oh * ow)


@register(INPUT_GRAD, "flipped-kernel", applies=flipped_kernel_applies,
          reason="stride 1, dy covers the input: a convolution of dy with the flipped kernel (no col2im)")
def input_grad_by_flipped_kernel(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy`` at stride 1: itself a convolution.

    dy padded by ``d(k-1) - p`` and correlated with the kernel flipped in space
    and with in/out channels swapped::

        dx[n, c, y, x] = sum_{o,i,j} W[o, c, kh-1-i, kw-1-j] * dypad[n, o, y + i*dh, x + j*dw]

    An im2col of dy and a product with Cin rows replace the product with only
    Cout inner terms (slow in BLAS when Cout is small) and the kh*kw
    read-modify-write passes of col2im.
    """
    xp = get_array_module(dy)
    u, _ = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    flipped = xp.ascontiguousarray(weight.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])  # (Cin, Cout, kh, kw)
    geometry = ((1, 1), _full_padding(u), u.dilation, tuple(x_shape[2:]))
    return run(FORWARD, conv_facts(dy.shape, flipped.shape, *geometry), dy, flipped, *geometry,
               skip=(_RUNS,))  # dy does not repeat lines: not searched


@register(INPUT_GRAD, "sub-pixel", applies=lambda u, cout, up_to_runs=False: u.blocked,
          reason="stride divides kernel (k = m*s): a stride-1 m x m convolution, then depth to space")
def input_grad_by_blocks(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy`` when the stride divides the kernel (``k = m*s``, dilation 1): a sub-pixel convolution.

    Padded input pixel ``(P*s + r, Q*s + t)`` (0 <= r, t < s) collects
    ``dy[o, P - a, Q - e] * W[o, c, a*s + r, e*s + t]`` over ``a, e < m``. So
    each s x s block of the input gradient is one pixel of a stride-1
    convolution of dy (padded by m - 1, kernel m x m flipped) with
    ``Cin * s * s`` output channels ``(c, r, t)``, and a depth-to-space
    reshuffle lays those channels out as the block's pixels. For FCN's
    upsampling (k = 2s) that is a 2x2 convolution and one copy, instead of
    k*k overlapping strided adds.
    """
    xp = get_array_module(dy)
    u, _ = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    n, cout, oh, ow = dy.shape
    cin, (kh, kw), (sh, sw) = weight.shape[1], weight.shape[2:], u.stride
    mh, mw = kh // sh, kw // sw
    # blocked[(c, r, t), o, a', e'] = W[o, c, (m-1-a')*s + r, (m-1-e')*s + t]
    blocked = weight.reshape(cout, cin, mh, sh, mw, sw)[:, :, ::-1, :, ::-1, :]
    blocked = xp.ascontiguousarray(blocked.transpose(1, 3, 5, 0, 2, 4)).reshape(cin * sh * sw, cout, mh, mw)
    geometry = ((1, 1), (mh - 1, mw - 1), (1, 1))
    per_block = run(FORWARD, conv_facts(dy.shape, blocked.shape, *geometry), dy, blocked, *geometry,
                    skip=(_RUNS,))  # dy does not repeat lines
    hb, wb = per_block.shape[2:]                                               # HB = OH + m - 1
    gpad = u.zeros(xp, dy.dtype, blocked=True)
    # depth to space: block (P, Q) of channel c gets per_block[n, (c, r, t), P, Q] at pixel (r, t)
    u.blocks(gpad)[:, :, :hb, :, :wb, :] = per_block.reshape(n, cin, sh, sw, hb, wb).transpose(0, 1, 4, 2, 5, 3)
    return u.crop(gpad)


@register(INPUT_GRAD, "bands-col2im", reason="no shortcut for this geometry: W^T dy and col2im band by band "
                                             "of output rows (cache-sized bands when Cout <= 64)")
def input_grad_by_bands(dy, weight, x_shape, stride, padding, dilation):
    """``C^T dy``: for each band of output rows, the columns' gradient ``W^T dy``, added back by col2im."""
    xp = get_array_module(dy)
    u, cout = conv_facts(x_shape, weight.shape, stride, padding, dilation, dy.shape[2:])
    n, _, oh, ow = dy.shape
    wt = weight.reshape(cout, -1).T                        # (Cin*kh*kw, Cout)
    dy3 = dy.reshape(n, cout, oh * ow)
    gpad = u.zeros(xp, dy.dtype)
    for r0, r1 in u.bands(xp, dy.itemsize, cout):
        dcols = workspace(xp, dy.dtype, u.band_shape(r0, r1))
        xp.matmul(wt, dy3[:, :, r0 * ow:r1 * ow], out=dcols)  # (N, Cin*kh*kw, band)
        u.fold(dcols, gpad, r0, r1)
    return u.crop(gpad)


# --------------------------------------------------------------------------- weight gradient: dW = dy . cols^T

@register(WEIGHT_GRAD, "winograd", applies=winograd_applies, uses_memo=True,
          reason="as the forward's: the adjoint of Winograd's F(2x2, 3x3), on the forward's transformed "
                 "tiles where they were kept")
def weight_grad_by_winograd(dy, x, weight_shape, stride, padding, dilation, accumulate=None, overwrite=False,
                            memo=None):
    """``dW += C_x^T dy`` by the adjoint of :func:`forward_by_winograd`, band by band.

    Per band: dM = (At kron At)^T of dy's 2x2 tiles, dU[k] += dM[k] V[k]^T (a
    partial sum per band, added in band order), and at the end
    dW = (G kron G)^T dU. V is the forward's where the layer kept it for this x.
    """
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    u, _ = conv_facts(x.shape, weight_shape, stride, padding, dilation, (oh, ow))
    accumulate = check_accumulate(accumulate, weight_shape, xp, dy.dtype, "conv_weight_grad")
    cin = x.shape[1]
    tiling = winograd.Tiling(x.shape, u.padding, u.out_hw)
    kept = None if memo is None else memo.pop(_WINO_KEPT, None)
    if kept is not None and kept[0] is x and kept[1] == _unfolding_key(u):
        bands, tiles, halves = kept[2], kept[3], None
    else:
        bands, tiles, halves = _winograd_bands(xp, tiling, cin, x.itemsize), None, tiling.split_padded(x)
    partial = [xp.zeros((16, cout, cin), dtype=dy.dtype) for _ in bands]

    def one_band(index):
        band = bands[index]
        if tiles is not None:
            v = tiles[index]
        else:
            v = winograd.input_tiles(tiling, halves, band, _band_tiles(None, tiling, band, cin, xp, x.dtype))
        dm = winograd.output_tile_grads(tiling, dy, band)
        partial[index] += xp.matmul(dm, v.transpose(0, 2, 1))   # (16, Cout, tiles) @ (16, tiles, Cin)

    _run_winograd_bands(bands, one_band)
    for extra in partial[1:]:
        partial[0] += extra
    return add_or_store(accumulate, winograd.kernel_grad(partial[0]), overwrite)


@register(WEIGHT_GRAD, "shifted", applies=lambda u, cout: shifted_applies(u, cout, 8, 8),
          reason=f"stride 1, <= 8 channels in and out (in batches of {SHIFTED_BATCH} or more: "
                 f"<= {SHIFTED_BATCH_MOST_CHANNELS}, Cout <= 2 Cin): dW[:, :, i, j] = dy "
                 "times a shifted slice, on the padded width, no columns")
def weight_grad_by_shifted_products(dy, x, weight_shape, stride, padding, dilation, accumulate=None,
                                    overwrite=False):
    """``dW += dy . cols^T`` at stride 1 as k*k products with shifted slices, band by band of output rows.

    Inputs: dy (N, Cout, OH, OW), x (N, Cin, H, W), weight_shape (Cout, Cin, kh, kw),
    stride (1, 1); ``accumulate`` as for the textbook route. Returns: dW (Cout, Cin, kh, kw).
    With dy written on the padded width Wp (``dywide``, zeros in the junk columns
    q >= OW) and ``xflat`` as in :func:`forward_by_shifted_products`::

        dW[:, :, i, j] = sum_{n, l} dywide[n, :, l] xflat[n, :, l + i*dh*Wp + j*dw]^T

    Per-thread partial sums, added in worker order (as the ``bands`` route does).
    """
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    u, _ = conv_facts(x.shape, weight_shape, stride, padding, dilation, (oh, ow))
    accumulate = check_accumulate(accumulate, weight_shape, xp, dy.dtype, "conv_weight_grad")
    cin, (kh, kw) = u.x_shape[1], u.kernel
    xflat, wp = _flat_padded(x, u)
    taps = _taps(u, wp)
    bands = _shifted_bands(u, xp, x.itemsize, wp)
    workers = workers_for(xp, len(bands), n)
    partial = [xp.zeros((kh * kw, cout, cin), dtype=dy.dtype) for _ in range(workers)]

    def one_band(worker, r0, r1):
        length = (r1 - r0) * wp
        wide = workspace(xp, dy.dtype, (n, cout, r1 - r0, wp), "shifted dy")
        wide[:, :, :, :ow] = dy[:, :, r0:r1]
        wide[:, :, :, ow:] = 0                                       # junk columns contribute nothing
        wide = wide.reshape(n, cout, length)
        for t, (_, _, off) in enumerate(taps):
            src = xflat[:, :, r0 * wp + off:r0 * wp + off + length]  # (N, Cin, band * Wp)
            partial[worker][t] += xp.matmul(wide, src.transpose(0, 2, 1)).sum(axis=0)

    run_bands(bands, one_band, workers)
    for extra in partial[1:]:
        partial[0] += extra
    return add_or_store(accumulate, partial[0].reshape(kh, kw, cout, cin).transpose(2, 3, 0, 1), overwrite)


@register(WEIGHT_GRAD, "bands", uses_memo=True,
          reason="im2col band by band (or the forward's columns, kept), one partial sum per CPU thread, "
                 "the product in the orientation BLAS runs faster")
def weight_grad_by_bands(dy, x, weight_shape, stride, padding, dilation, accumulate=None, overwrite=False,
                         memo=None):
    """``dW += sum over bands of dy_band . cols_band^T``, bands shared by threads, summed in worker order.
    ``memo``: a layer's; where its forward kept the columns of this very x (:func:`forward_by_bands`),
    they are the one band, not unfolded again."""
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    u, _ = conv_facts(x.shape, weight_shape, stride, padding, dilation, (oh, ow))
    accumulate = check_accumulate(accumulate, weight_shape, xp, dy.dtype, "conv_weight_grad")
    dw = accumulate.reshape(cout, u.rows)  # a view, so the += below lands in accumulate
    dy3 = dy.reshape(n, cout, oh * ow)
    kept = None if memo is None else memo.pop(_KEPT, None)
    if kept is not None and kept[0] is x and kept[1] == _unfolding_key(u):
        _add_products(dw, dy3, kept[2], overwrite)  # the columns im2col(x) would give: the same numbers, one band
        return accumulate
    xpad = u.pad(x)
    bands = list(u.bands(xp, x.itemsize, cout))
    workers = workers_for(xp, len(bands), n)
    partial = [dw] + [xp.zeros_like(dw) for _ in range(workers - 1)]  # worker 0 adds straight into dw
    first = [overwrite] + [False] * (workers - 1)                     # whether a worker's next band stores

    def one_band(worker, r0, r1):
        cols = u.unfold(xpad, r0, r1, workspace(xp, x.dtype, u.band_shape(r0, r1)))
        _add_products(partial[worker], dy3[:, :, r0 * ow:r1 * ow], cols, first[worker])
        first[worker] = False

    run_bands(bands, one_band, workers)
    for extra in partial[1:]:
        dw += extra
    return accumulate


def _add_products(dw, dy3, cols, overwrite=False):
    """dw (Cout, K) += sum_n dy3[n] @ cols[n]^T, for dy3 (N, Cout, L) and cols (N, K, L); = where ``overwrite``."""
    xp = get_array_module(dw)
    n, cout, length = dy3.shape
    k = cols.shape[1]
    if length >= k and length >= cout:
        # Many positions (early layers): OpenBLAS runs cols @ dy^T faster than
        # dy @ cols^T, and the (N, K, Cout) results are small.
        add_or_store(dw, xp.matmul(cols, dy3.transpose(0, 2, 1)).sum(axis=0).T, overwrite)
        return
    # Few positions, large weight (fc6: 4096 x 25088): one product over the
    # batch folded into the positions (copies of small arrays when N > 1),
    # straight into dw where it may be overwritten, else into a reused buffer
    # the size of the weight, then one add.
    dy2 = dy3.transpose(1, 0, 2).reshape(cout, n * length)
    cols2 = cols.transpose(1, 0, 2).reshape(k, n * length)
    if overwrite:
        xp.matmul(dy2, cols2.T, out=dw)
    else:
        dw += xp.matmul(dy2, cols2.T, out=workspace(xp, dw.dtype, dw.shape, "products"))


# --------------------------------------------------------------------------- bias gradient: db = sum of dy

@register(BIAS_GRAD, "ones-product", reason="the same sum as dy's rows times a vector of ones: BLAS sums on every "
                                             "core")
def bias_grad_by_ones(dy):
    """``db = sum_n dy[n] @ 1``: dy (N, Cout, OH, OW) as N*Cout rows, each multiplied by ones (a matrix-vector
    product, which BLAS shares between cores; NumPy's sum runs on one). Float rounding differs from the
    textbook's pairwise sum (BLAS adds in its own order)."""
    xp = get_array_module(dy)
    n, cout, oh, ow = dy.shape
    rows = xp.ascontiguousarray(dy).reshape(n * cout, oh * ow)
    return (rows @ constant_array(xp, (oh * ow,), dy.dtype, 1)).reshape(n, cout).sum(axis=0)
