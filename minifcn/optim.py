"""SGD with momentum, weight decay and per-parameter multipliers, and learning-rate schedules.

Update of one parameter ``w`` with gradient ``g`` (PyTorch's form)::

    g  <- g + weight_decay * decay_mult * w
    v  <- momentum * v + g
    w  <- w - lr * lr_mult * (v            if not nesterov
                              g + momentum * v   if nesterov)

Loss normalisation and learning rate go together. With ``reduction='sum'``
(the FCN reference: the loss is summed over every pixel of a whole image) the
gradient is about (number of pixels) times larger than with ``'mean'``, so
the reference's learning rate is 1e-10 (FCN-32s, about 250,000 pixels per
500 x 500 image), which is a per-pixel mean-loss rate of about 2.5e-5 (for
fine-tuning from ImageNet weights, with momentum 0.99). A mean-loss learning
rate with a summed loss diverges (NaN); a sum-loss learning rate with a mean
loss does not learn. :func:`suggest_lr` converts either way.
"""
from __future__ import annotations

import math

import numpy as np

from .backend import elementwise_kernel, get_array_module
from .layers.columns import workspace
from .module import Module, Parameter
from .parallel import num_threads, run_pieces
from .routes import register, run, select

_CHUNK = 1 << 16  # elements updated at a time: a chunk of w, g, v and the scratch buffer (1 MiB in float32) stays in L2
SHARED_UPDATE_BYTES = 1 << 20  # a parameter this large has its chunks shared by the CPU threads

# The GPU route: the whole update of one parameter as one CuPy kernel, element i at a time
# (the chunked loop below launches several small kernels per 2^16-element chunk on a GPU:
# hundreds a step for the full FCN).
# Same operations in the same order as the CPU route, and no fused multiply-adds
# (--fmad=false), so both give the same bits.
_SGD_OPERATION = """
T d = wd != 0 ? g + wd * w : g;     // g + weight_decay * decay_mult * w
if (mu != 0) {
    v = mu * v + d;                 // momentum buffer
    d = nesterov ? d + mu * v : v;  // the step direction
}
w -= lr * d;
"""


def fused_update(w, g, v, lr: float, wd: float, mu: float, nesterov: bool) -> None:
    """SGD's update of one CuPy parameter ``w`` (and its velocity ``v``) in place, in one kernel.

    ``lr`` and ``wd`` already include the parameter's multipliers.
    """
    kernel = elementwise_kernel("T g, T lr, T wd, T mu, bool nesterov", "T w, T v", _SGD_OPERATION,
                                "minifcn_sgd_update", ("--fmad=false",))
    t = w.dtype.type
    kernel(g, t(lr), t(wd), t(mu), bool(nesterov), w, v)


# Array modules with a fused kernel: the route "fused" applies to their parameters.
FUSED_UPDATES = {"cupy": fused_update}


def suggest_lr(reduction: str, pixels_per_batch: int, mean_lr: float | None = None,
               sum_lr: float | None = None) -> float:
    """The learning rate for a loss with ``reduction`` that takes the same steps as a given one.

    Give the rate you know as ``mean_lr`` (for a per-pixel mean loss) or as
    ``sum_lr`` (for a loss summed over the pixels, as in the FCN reference);
    with neither, ``mean_lr=1e-2``. A summed loss's gradient is the mean
    loss's times the number of (labelled) pixels per batch, so
    ``sum_lr = mean_lr / pixels_per_batch``. Examples: the reference's 1e-10
    on 500 x 500 images, ``suggest_lr('mean', 250_000, sum_lr=1e-10)``, is a
    mean-loss rate of 2.5e-5; ``suggest_lr('sum', 128 * 128, mean_lr=0.01)``
    is 6.1e-7.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if mean_lr is not None and sum_lr is not None:
        raise ValueError(f"give mean_lr or sum_lr, not both (got {mean_lr} and {sum_lr})")
    pixels = int(pixels_per_batch)
    if pixels < 1:
        raise ValueError(f"pixels_per_batch must be >= 1, got {pixels_per_batch}")
    if sum_lr is not None:
        mean_lr = sum_lr * pixels
    elif mean_lr is None:
        mean_lr = 1e-2
    return mean_lr if reduction == "mean" else mean_lr / pixels


UPDATE = "sgd_update"


@register(UPDATE, "textbook", textbook=True, reason="the update formula on whole parameters (temporaries as large)")
def sgd_update(w, g, v, lr, momentum, weight_decay, nesterov, scratch=None):
    """The update of the module docstring on flat arrays w, g, v (v and w in place; no v without momentum)."""
    g = g + weight_decay * w
    if momentum:
        v *= momentum
        v += g
        g = g + momentum * v if nesterov else v
    w -= lr * g


def _facts(w):
    """What the SGD routes' rules read: the parameter's size and array module."""
    return w.size, get_array_module(w).__name__


@register(UPDATE, "fused", applies=lambda size, module: module in FUSED_UPDATES,
          reason="one element-wise kernel per parameter (CuPy), the same operations in the same order")
def sgd_update_fused(w, g, v, lr, momentum, weight_decay, nesterov, scratch=None):
    """:func:`sgd_update` as the array module's fused kernel (:data:`FUSED_UPDATES`)."""
    FUSED_UPDATES[get_array_module(w).__name__](w, g, v, lr, weight_decay, momentum, nesterov)


@register(UPDATE, "chunked", reason="in place, 2^16 elements at a time through a reused scratch buffer "
                                   "(cache-sized); a large parameter's chunks shared by the CPU threads")
def sgd_update_in_chunks(w, g, v, lr, momentum, weight_decay, nesterov, scratch=None):
    """:func:`sgd_update` in chunks, with no temporary larger than ``scratch()`` (a flat buffer).

    A NumPy parameter of ``SHARED_UPDATE_BYTES`` or more is cut into one run of whole chunks per CPU
    thread, each thread with a scratch buffer of its own. The update is memory-bound and one core
    does not reach the memory's bandwidth (the small FCN's fc6 and fc7, 89 % of its parameters: the
    update took 3.4 ms on one thread, 2.7 on two on the AMD EPYC Zen 2; benchmarks/RESULTS.md). Every
    element goes through the same operations whichever thread takes it: the same bits.
    """
    xp = get_array_module(w)
    chunks = -(-w.size // _CHUNK)
    workers = min(num_threads(), chunks) if xp.__name__ == "numpy" and w.nbytes >= SHARED_UPDATE_BYTES else 1
    if workers > 1:
        edges = [min(w.size, _CHUNK * (chunks * k // workers)) for k in range(workers + 1)]

        def piece(bounds):
            a, b = bounds
            buf = workspace(xp, w.dtype, (min(_CHUNK, b - a),), "sgd chunk")  # this thread's own
            _update_chunks(w[a:b], g[a:b], v[a:b], lr, momentum, weight_decay, nesterov, buf)

        run_pieces(list(zip(edges, edges[1:])), piece)
        return
    buf = scratch() if scratch is not None else xp.empty(min(w.size, _CHUNK) or 1, dtype=w.dtype)
    _update_chunks(w, g, v, lr, momentum, weight_decay, nesterov, buf)


def _update_chunks(w, g, v, lr, mu, wd, nesterov, buf):
    """The update of flat w, g, v, ``buf.size`` elements at a time through ``buf``."""
    xp = get_array_module(w)
    for start in range(0, w.size, buf.size):  # chunks of a flat parameter, not pixels
        sl = slice(start, start + buf.size)
        wc, gc, vc, b = w[sl], g[sl], v[sl], buf[: min(buf.size, w.size - start)]
        if wd:
            xp.multiply(wc, wd, out=b)    # b = g + wd * w
            b += gc
            g_eff = b
        else:
            g_eff = gc                    # no decay: use the gradient itself, no copy
        if mu:
            vc *= mu                      # v = mu * v + g
            vc += g_eff
            if nesterov:                  # step = lr * (g + mu * v)
                if g_eff is b:
                    b += mu * vc              # (a chunk-sized temporary)
                else:
                    xp.multiply(vc, mu, out=b)
                    b += g_eff
                b *= lr
            else:
                xp.multiply(vc, lr, out=b)  # step = lr * v, one pass
        else:
            xp.multiply(g_eff, lr, out=b)
        wc -= b


STEP = "sgd_step"


@register(STEP, "per-parameter", textbook=True, reason="each parameter's update on its own arrays")
def step_each_parameter(opt) -> None:
    """:meth:`SGD.step`: the update of each parameter in turn."""
    for name, p in opt.named_params:
        opt.update(p, p.data, p.grad, opt.velocity[name])


@register(STEP, "packed", reason="one update per group of parameters with the same multipliers, over the flat "
                                 "buffers SGD laid them out in (a small FCN: 2 calls a step instead of 38)")
def step_packed(opt) -> None:
    """:meth:`SGD.step` as one update per :class:`PackedGroup` that is still laid out as SGD made it (and
    each parameter in turn for the others). Every element goes through the same operations with the same
    scalars as in :func:`step_each_parameter`: the same bits."""
    for group in opt.groups:
        if group.intact(opt.velocity):
            opt.update(group.params[0][1], group.data, group.grad, group.velocity)
        else:
            for name, p in group.params:
                opt.update(p, p.data, p.grad, opt.velocity[name])


ALIGN_BYTES = 64  # each parameter's first element in SGD's flat buffers: as aligned as an array of its own
# (4-byte-aligned weights slowed the full-width FCN-8s's forward+backward by 4 %: benchmarks/RESULTS.md)


def aligned_offsets(sizes, itemsize: int):
    """Element offsets of arrays of ``sizes`` laid out one after the other, each rounded up to a
    multiple of ``ALIGN_BYTES``; and the total length (the gaps between them included)."""
    step = max(1, ALIGN_BYTES // itemsize)
    offsets, end = [], 0
    for size in sizes:
        start = -(-end // step) * step
        offsets.append(start)
        end = start + size
    return offsets, end


def aligned_zeros(xp, size: int, dtype):
    """A 1-D array of ``size`` zeros whose first element lies on an ``ALIGN_BYTES`` boundary."""
    itemsize = np.dtype(dtype).itemsize
    raw = xp.zeros(size + ALIGN_BYTES // itemsize, dtype)
    address = raw.__array_interface__["data"][0] if hasattr(raw, "__array_interface__") else raw.data.ptr
    start = (-address % ALIGN_BYTES) // itemsize
    return raw[start:start + size]


class PackedGroup:
    """Parameters of one array module, dtype, ``lr_mult`` and ``decay_mult``, with their data, gradients
    and momentum laid out in three flat arrays (``data``, ``grad``, ``velocity``): each ``p.data``,
    ``p.grad`` and momentum buffer is a view into one (their values kept), so one update of the flat
    arrays updates them all. The three have the same layout, :func:`aligned_offsets` (the few elements
    between two parameters are zeros, and an update keeps them zero). ``grad`` is the group's part of
    one buffer that holds the gradients of every group of that array module and dtype
    (``grad_buffer``), so that a gradient average over several ranks is one exchange a step. With
    ``grad_buffer`` None (the gradients already are views into someone else's buffer: distributed
    gradient buckets made before SGD) the gradients are left where they are, and the group is updated
    parameter by parameter. A group of one keeps its own data and momentum arrays."""

    def __init__(self, params, velocity, grad_buffer=None):
        self.params = params
        first = params[0][1].data
        xp = get_array_module(first)
        offsets, total = aligned_offsets([p.size for _, p in params], first.dtype.itemsize)
        alone = len(params) == 1
        self.data = first if alone else aligned_zeros(xp, total, first.dtype)
        self.velocity = velocity[params[0][0]] if alone else aligned_zeros(xp, total, first.dtype)
        self.grad = grad_buffer
        self._views = []
        for (name, p), offset in zip(params, offsets):
            part = slice(offset, offset + p.size)
            if not alone:
                w, v = self.data[part].reshape(p.shape), self.velocity[part].reshape(p.shape)
                w[...], v[...] = p.data, velocity[name]
                p.data, velocity[name] = w, v
            if grad_buffer is not None:
                g = grad_buffer[part].reshape(p.shape)
                g[...] = p.grad
                p.grad = g
            self._views.append((name, p, p.data, velocity[name], p.grad))

    def intact(self, velocity) -> bool:
        """Whether every parameter, gradient and momentum buffer of the group is still its view (not
        replaced since, as ``Module.to`` or an assignment replaces it) and every parameter still has the
        group's multipliers. Reading ``p.grad`` also writes the zeros of a lazily zeroed gradient that no
        backward pass reached."""
        if self.grad is None:
            return False
        lr_mult, decay_mult = self.params[0][1].lr_mult, self.params[0][1].decay_mult
        return all(p.data is w and p.grad is g and velocity[name] is v and p.lr_mult == lr_mult
                   and p.decay_mult == decay_mult for name, p, w, v, g in self._views)


def _pack(named, velocity):
    """The :class:`PackedGroup` of each (array module, dtype, lr_mult, decay_mult) among the ``named``
    parameters, in order of first appearance; the gradients of each (array module, dtype) in one buffer,
    group after group (each group's part aligned)."""
    by_key, seen = {}, set()
    for name, p in named:
        if id(p) not in seen:  # a parameter listed twice is laid out once
            seen.add(id(p))
            by_key.setdefault(_group_key(p), []).append((name, p))
    by_kind = {}
    for key, members in by_key.items():
        by_kind.setdefault(key[:2], []).append(members)
    groups = []
    for kind in by_kind.values():
        first = kind[0][0][1].data
        lengths = [aligned_offsets([p.size for _, p in group], first.dtype.itemsize)[1] for group in kind]
        starts, total = aligned_offsets(lengths, first.dtype.itemsize)
        own = all(p.grad.base is None for group in kind for _, p in group)  # not yet in someone's buckets
        buffer = aligned_zeros(get_array_module(first), total, first.dtype) if own else None
        for group, start, length in zip(kind, starts, lengths):
            groups.append(PackedGroup(group, velocity, None if buffer is None else buffer[start:start + length]))
    return groups


def _group_key(p):
    return get_array_module(p.data).__name__, p.data.dtype.str, p.lr_mult, p.decay_mult


class SGD:
    """Stochastic gradient descent.

    Args:
        params: a Module, a list of Parameters, or ``named_parameters()``
            pairs. Parameters with ``trainable=False`` are left alone.
        lr: base learning rate; each parameter uses ``lr * p.lr_mult``.
        momentum, weight_decay (times ``p.decay_mult``), nesterov.

    ``step()`` takes one of two routes (:data:`STEP`): ``per-parameter``,
    the textbook one, updates each parameter on its own arrays; ``packed``
    updates each :class:`PackedGroup` (the parameters that share their
    multipliers, dtype and array module) as one flat array. For that, SGD
    lays each group out in flat buffers when it is made: ``p.data`` and
    ``p.grad`` become views into them, with their values (an array that was
    ``p.data`` before is no longer the parameter's). Either way, a flat array
    is updated in place by the route :func:`minifcn.routes.select` picks for
    :data:`UPDATE`: ``fused`` (CuPy: one kernel per array,
    :func:`fused_update`), ``chunked`` (NumPy: 2^16 elements at a time
    through one scratch buffer, no temporary as large as a parameter; a large
    array's chunks shared by the CPU threads) or, under
    ``MINIFCN_ROUTE=textbook``, :func:`sgd_update`, the same formula on whole
    arrays. ``SGD.route(p)`` names the update route of ``p``.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
        if isinstance(params, Module):
            params = params.named_parameters()
        named = []
        for i, item in enumerate(params):
            name, p = item if isinstance(item, tuple) else (str(i), item)
            if not isinstance(p, Parameter):
                raise TypeError(f"SGD: expected Parameters, got {type(p).__name__} for {name!r}")
            if p.trainable:
                named.append((name, p))
        if not named:
            raise ValueError("SGD: no trainable parameters")
        if not lr > 0 or not math.isfinite(lr):
            raise ValueError(f"SGD: lr must be a positive finite number, got {lr!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"SGD: momentum must be in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"SGD: weight_decay must be >= 0, got {weight_decay!r}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        self.named_params = named
        self.lr, self.momentum, self.weight_decay, self.nesterov = float(lr), float(momentum), float(weight_decay), bool(nesterov)
        self.velocity = {name: get_array_module(p.data).zeros_like(p.data) for name, p in named}
        self._scratch = {}
        self.groups = _pack(named, self.velocity)

    def zero_grad(self) -> None:
        for _, p in self.named_params:
            p.zero_grad()

    def _buffer(self, xp, dtype, size):
        key = (xp.__name__, np.dtype(dtype).str)
        buf = self._scratch.get(key)
        if buf is None or buf.size < min(size, _CHUNK):
            buf = self._scratch[key] = xp.empty(min(size, _CHUNK) if size > 0 else 1, dtype=dtype)
        return buf

    @staticmethod
    def route(p: Parameter) -> str:
        """'fused' (CuPy), 'chunked' (NumPy) or 'textbook' (in textbook mode): how ``step`` updates ``p``."""
        return select(UPDATE, *_facts(p.data)).name

    def step(self) -> None:
        """Update every trainable parameter in place, by the route of :data:`STEP` in force."""
        run(STEP, (), self)

    def update(self, p: Parameter, w, g, v) -> None:
        """The update of the arrays ``w, g, v`` (any shape, contiguous) with ``p``'s multipliers."""
        w, g, v = w.reshape(-1), g.reshape(-1), v.reshape(-1)
        args = (w, g, v, self.lr * p.lr_mult, self.momentum, self.weight_decay * p.decay_mult, self.nesterov)
        run(UPDATE, _facts(w), *args, scratch=lambda: self._buffer(get_array_module(w), w.dtype, w.size))

    def state_dict(self):
        """Momentum buffers by parameter name (arrays), for checkpoints."""
        return {f"momentum.{name}": v for name, v in self.velocity.items()}

    def load_state_dict(self, state) -> None:
        for name, v in self.velocity.items():
            key = f"momentum.{name}"
            if key not in state:
                raise KeyError(f"SGD state: missing {key!r}")
            value = state[key]
            if tuple(value.shape) != tuple(v.shape):
                raise ValueError(f"SGD state: {key} has shape {tuple(value.shape)}, expected {tuple(v.shape)}")
            xp = get_array_module(v)
            v[...] = xp.asarray(value, dtype=v.dtype)


class ConstantLR:
    """``lr(t) = base``."""

    def __init__(self, base: float):
        self.base = float(base)

    def __call__(self, iteration: int) -> float:
        return self.base


class StepLR:
    """``lr(t) = base * gamma ** floor(t / step_size)``."""

    def __init__(self, base: float, step_size: int, gamma: float = 0.1):
        if step_size < 1:
            raise ValueError(f"StepLR: step_size must be >= 1, got {step_size}")
        self.base, self.step_size, self.gamma = float(base), int(step_size), float(gamma)

    def __call__(self, iteration: int) -> float:
        return self.base * self.gamma ** (iteration // self.step_size)


class PolyLR:
    """``lr(t) = base * (1 - t / max_iter) ** power`` (0 from max_iter on)."""

    def __init__(self, base: float, max_iter: int, power: float = 0.9):
        if max_iter < 1:
            raise ValueError(f"PolyLR: max_iter must be >= 1, got {max_iter}")
        if not power > 0:
            raise ValueError(f"PolyLR: power must be > 0, got {power!r}")
        self.base, self.max_iter, self.power = float(base), int(max_iter), float(power)

    def __call__(self, iteration: int) -> float:
        return self.base * max(0.0, 1.0 - iteration / self.max_iter) ** self.power


class WarmupLR:
    """Linear warm-up in front of another schedule: ``lr(t) = schedule(t) * min(1, (t + 1) / warmup)``.

    The first step uses ``1 / warmup`` of the scheduled rate, step ``warmup - 1`` the full
    rate (Goyal et al. 2017, "gradual warm-up"): a higher peak survives the first steps of
    a network trained from scratch.
    """

    def __init__(self, schedule, warmup: int):
        if int(warmup) != warmup or warmup < 1:
            raise ValueError(f"WarmupLR: warmup must be an integer >= 1, got {warmup!r}")
        self.schedule, self.warmup = schedule, int(warmup)

    def __call__(self, iteration: int) -> float:
        return self.schedule(iteration) * min(1.0, (iteration + 1) / self.warmup)


def make_schedule(name: str, base: float, max_iter: int, step_size: int | None = None, gamma: float = 0.1,
                  power: float = 0.9, warmup: int = 0):
    """'constant', 'step' (step_size defaults to a third of max_iter) or 'poly' (``power``),
    behind a linear warm-up over the first ``warmup`` iterations when ``warmup > 0``."""
    if name == "constant":
        schedule = ConstantLR(base)
    elif name == "step":
        schedule = StepLR(base, step_size or max(1, max_iter // 3), gamma)
    elif name == "poly":
        schedule = PolyLR(base, max_iter, power)
    else:
        raise ValueError(f"unknown schedule {name!r}; choose constant, step or poly")
    if int(warmup) != warmup or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    return WarmupLR(schedule, warmup) if warmup else schedule
