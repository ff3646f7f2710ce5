"""Check analytic gradients against central differences, in float64.

A layer maps inputs and parameters to outputs ``y``. Its backward, given an
upstream gradient ``g``, must return the vector-Jacobian product
``d<y, g>/dx`` (and add ``d<y, g>/dW`` to each parameter's ``.grad``). So the
checker picks a random ``g`` once and treats ``L = <y, g>`` as the scalar to
differentiate; a random ``g`` catches errors that ``g = 1`` (the sum of the
outputs) hides, such as a transposed or permuted gradient.

Two modes:

* ``'random'``: for a random direction ``v``, compare
  ``(L(t + eps v) - L(t - eps v)) / (2 eps)`` with ``<grad_t, v>``.
  Two forward passes per direction, whatever the tensor's size.
* ``'elementwise'``: perturb every element in turn; names the worst index.

Example::

    from minifcn.gradcheck import check_layer
    report = check_layer(MyLayer(), x)      # x any float array
    print(report)                           # a table, one row per tensor
    assert report.passed

Relative error of an element: ``|num - ana| / max(|num|, |ana|, floor)`` with
``floor = 1e-3 * max |ana|`` over the tensor (and at least 1e-12), so entries
that are zero up to rounding are judged against the tensor's own scale.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, to_numpy
from .module import Module


@dataclass
class TensorReport:
    """How one tensor's analytic gradient compares with the numerical one."""

    name: str
    shape: tuple
    max_abs_err: float
    max_rel_err: float
    worst_index: tuple | None
    passed: bool


@dataclass
class GradcheckReport:
    """Every checked tensor of one layer; ``passed`` if all of them pass."""

    layer: str
    mode: str
    tol: float
    tensors: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def max_rel_err(self) -> float:
        return max((t.max_rel_err for t in self.tensors), default=0.0)

    def rows(self):
        for t in self.tensors:
            where = "" if t.worst_index is None else str(tuple(int(i) for i in t.worst_index))
            yield (t.name, str(t.shape), f"{t.max_abs_err:.2e}", f"{t.max_rel_err:.2e}", where,
                   "ok" if t.passed else "FAIL")

    def __str__(self) -> str:
        header = ("tensor", "shape", "max abs err", "max rel err", "worst index", "result")
        rows = [header, *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = [f"{self.layer}: gradient check ({self.mode}, tol {self.tol:g})"]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
        return "\n".join(lines)


def _is_float_array(a) -> bool:
    return hasattr(a, "dtype") and hasattr(a, "shape") and a.dtype.kind == "f"


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _random_like(out, rng, xp):
    if isinstance(out, tuple):
        return tuple(_random_like(o, rng, xp) for o in out)
    if isinstance(out, float):
        return float(rng.standard_normal())
    return xp.asarray(rng.standard_normal(out.shape))


def _difference(a, b):
    if isinstance(a, tuple):
        return tuple(_difference(x, y) for x, y in zip(a, b))
    return a - b


def _inner(out, g) -> float:
    if isinstance(out, tuple):
        return sum(_inner(o, gi) for o, gi in zip(out, g))
    if isinstance(out, float):
        return out * g
    return float((out * g).sum())


class _Objective:
    """``L(inputs, params) = <layer(*inputs), g>`` with the layer's random state replayed."""

    def __init__(self, layer: Module, inputs, upstream_seed: int):
        self.layer, self.inputs = layer, list(inputs)
        self.rngs = [m.rng for m in layer.modules() if isinstance(getattr(m, "rng", None), np.random.Generator)]
        self.states = [r.bit_generator.state for r in self.rngs]
        out = self._forward()
        xp = get_array_module(*[a for a in self.inputs if hasattr(a, "shape")])
        self.g = _random_like(out, np.random.default_rng(upstream_seed), xp)

    def _forward(self):
        for r, s in zip(self.rngs, self.states):
            r.bit_generator.state = s  # the same dropout mask every call
        return self.layer.forward(*self.inputs)

    def output(self):
        out = self._forward()
        if isinstance(out, tuple):
            return tuple(o.copy() for o in out)
        return out if isinstance(out, float) else out.copy()

    def central_difference(self, set_plus, set_minus, restore, eps) -> float:
        """``(L(t+) - L(t-)) / 2eps``, subtracting outputs element-wise *before* the
        inner product with g: two large sums cancelling would lose digits."""
        set_plus()
        plus = self.output()
        set_minus()
        minus = self.output()
        restore()
        return _inner(_difference(plus, minus), self.g) / (2 * eps)

    def analytic(self):
        """Run forward and backward once; return {tensor name: gradient}."""
        self.layer.zero_grad()
        self._forward()
        grads_in = _as_tuple(self.layer.backward(self.g))
        out = {}
        for i, gi in enumerate(grads_in):
            if gi is not None and i < len(self.inputs) and _is_float_array(self.inputs[i]):
                out[f"input{i}" if len(grads_in) > 1 else "input"] = gi
        for name, p in self.layer.named_parameters():
            if p.trainable:  # frozen parameters get no gradient by design
                out[name] = p.grad.copy()
        return out


def _tensors(objective: _Objective, names):
    """Map tensor names to the live arrays the objective reads."""
    inputs = objective.inputs
    diff = [i for i, a in enumerate(inputs) if _is_float_array(a)]
    live = {}
    for name in names:
        if name == "input":
            live[name] = inputs[0]
        elif name.startswith("input") and name[5:].isdigit():
            live[name] = inputs[int(name[5:])]
    params = dict(objective.layer.named_parameters())
    for name in names:
        if name in params:
            live[name] = params[name].data
    del diff
    return live


def _to_float64(layer: Module, inputs):
    layer = copy.deepcopy(layer)
    layer.astype(np.float64)
    inputs = [a.astype(np.float64) if _is_float_array(a) else a for a in inputs]
    return layer, inputs


def check_layer(layer: Module, *inputs, mode: str = "random", eps: float = 1e-5, tol: float = 1e-6,
                seed: int = 0, num_directions: int = 3, wrt=None, name: str | None = None) -> GradcheckReport:
    """Compare a layer's backward with central differences.

    Args:
        layer: any Module with ``forward(*inputs)`` and ``backward(upstream)``
            (a loss's backward takes a float scale). It is deep-copied and
            cast to float64; the original is not changed.
        inputs: the forward arguments; float arrays are cast to float64.
            ``backward`` returns one gradient (for ``inputs[0]``) or a tuple
            (one per input).
        mode: 'random' (cheap, any size) or 'elementwise' (names the worst index).
        eps: finite-difference step; tol: the largest relative error that passes.
        wrt: optional list of tensor names to check ('input', 'input1', 'weight', ...);
            default all.

    Returns:
        A :class:`GradcheckReport` (``print`` it for a table; ``.passed``).
    """
    if mode not in ("random", "elementwise"):
        raise ValueError(f"mode must be 'random' or 'elementwise', got {mode!r}")
    layer, inputs = _to_float64(layer, inputs)
    objective = _Objective(layer, inputs, seed)
    analytic = objective.analytic()
    names = [n for n in analytic if wrt is None or n in wrt]
    live = _tensors(objective, names)
    rng = np.random.default_rng(seed + 1)
    report = GradcheckReport(name or type(layer).__name__, mode, tol)
    for tname in names:
        t, ana = live[tname], analytic[tname]
        if mode == "random":
            report.tensors.append(_check_random(objective, tname, t, ana, eps, tol, rng, num_directions))
        else:
            report.tensors.append(_check_elementwise(objective, tname, t, ana, eps, tol))
    return report


def _check_random(objective, tname, t, ana, eps, tol, rng, num_directions) -> TensorReport:
    xp = get_array_module(t)
    worst_abs = worst_rel = 0.0
    for _ in range(num_directions):
        v = xp.asarray(rng.standard_normal(t.shape))
        original = t.copy()

        def assign(value):
            t[...] = value

        num = objective.central_difference(lambda: assign(original + eps * v), lambda: assign(original - eps * v),
                                           lambda: assign(original), eps)
        an = float((ana * v).sum())
        err = abs(num - an)
        rel = err / max(abs(num), abs(an), 1e-12)
        worst_abs, worst_rel = max(worst_abs, err), max(worst_rel, rel)
    return TensorReport(tname, tuple(t.shape), worst_abs, worst_rel, None, worst_rel <= tol)


def _check_elementwise(objective, tname, t, ana, eps, tol) -> TensorReport:
    num = np.zeros(t.shape)
    flat_t = t.reshape(-1)  # a view: writing into it perturbs the live tensor
    if flat_t.base is None and t.size > 1 and flat_t is not t:
        raise RuntimeError(f"{tname}: tensor is not contiguous; cannot perturb it in place")
    flat_num = num.reshape(-1)
    for k in range(t.size):
        old = float(flat_t[k])

        def assign(value, k=k):
            flat_t[k] = value

        flat_num[k] = objective.central_difference(lambda: assign(old + eps), lambda: assign(old - eps),
                                                   lambda: assign(old), eps)
    ana = to_numpy(ana).astype(np.float64)
    err = np.abs(num - ana)
    floor = max(1e-3 * float(np.abs(ana).max(initial=0.0)), 1e-12)
    rel = err / np.maximum(np.maximum(np.abs(num), np.abs(ana)), floor)
    worst = np.unravel_index(int(np.argmax(rel)), rel.shape) if rel.size else None
    max_rel = float(rel.max(initial=0.0))
    return TensorReport(tname, tuple(t.shape), float(err.max(initial=0.0)), max_rel, worst, max_rel <= tol)


def layer_suite(seed: int = 0):
    """One or more small configurations of every layer: (layer, configuration, factory).

    ``factory()`` returns ``(layer, inputs)``. Inputs avoid the points where
    ReLU and max pooling are not differentiable (values away from 0, no ties).
    """
    from . import layers as L  # noqa: PLC0415 (layers import nothing from here)

    rng = np.random.default_rng(seed)

    def images(*shape):
        x = rng.permutation(np.prod(shape)).reshape(shape).astype(np.float64)  # distinct values: no ties
        x = (x - x.mean()) / x.std()
        return x + np.sign(x) * 0.05  # away from 0

    labels = rng.integers(0, 4, (2, 5, 6))
    labels[0, 0, :2] = 255
    cases = [
        ("Conv2d", "3->4, k3, s1, p1", lambda: (L.Conv2d(3, 4, 3, padding=1), (images(2, 3, 6, 5),))),
        ("Conv2d", "2->3, k(3,2), s2, p(1,0), d2",
         lambda: (L.Conv2d(2, 3, (3, 2), stride=2, padding=(1, 0), dilation=2), (images(2, 2, 9, 6),))),
        ("Conv2d", "4->2, k1, no bias", lambda: (L.Conv2d(4, 2, 1, bias=False), (images(1, 4, 3, 5),))),
        ("ConvTranspose2d", "3->2, k4, s2, p1",
         lambda: (L.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (images(2, 3, 4, 3),))),
        ("ConvTranspose2d", "2->3, k(3,2), s(2,3), op(1,2), d2",
         lambda: (L.ConvTranspose2d(2, 3, (3, 2), stride=(2, 3), output_padding=(1, 2), dilation=2),
                  (images(1, 2, 3, 4),))),
        ("ConvTranspose2d", "1->1, k16, s8, bilinear",
         lambda: (L.ConvTranspose2d(1, 1, 16, stride=8, bias=False), (images(1, 1, 2, 3),))),
        ("MaxPool2d", "k2, s2, ceil", lambda: (L.MaxPool2d(2, ceil_mode=True), (images(2, 2, 5, 7),))),
        ("MaxPool2d", "k3, s2, p1", lambda: (L.MaxPool2d(3, 2, padding=1), (images(1, 3, 6, 6),))),
        ("Upsample", "nearest x2", lambda: (L.Upsample(2, "nearest"), (images(2, 2, 3, 4),))),
        ("Upsample", "bilinear x(2,3)", lambda: (L.Upsample((2, 3), "bilinear"), (images(2, 2, 3, 4),))),
        ("ReLU", "", lambda: (L.ReLU(), (images(2, 3, 4, 5),))),
        ("Dropout", "p=0.3, train", lambda: (L.Dropout(0.3, seed=1), (images(2, 3, 4, 5),))),
        ("Crop", "offset (1,2)", lambda: (L.Crop((1, 2)), (images(2, 3, 6, 7), (4, 3)))),
        ("Add", "", lambda: (L.Add(), (images(2, 3, 4, 5), images(2, 3, 4, 5)))),
        ("Concat", "3+2 channels", lambda: (L.Concat(), (images(2, 3, 4, 5), images(2, 2, 4, 5)))),
        ("Scale", "0.01", lambda: (L.Scale(0.01), (images(2, 3, 4, 5),))),
        ("SoftmaxCrossEntropy", "mean, ignore 255", lambda: (L.SoftmaxCrossEntropy(), (images(2, 4, 5, 6), labels))),
        ("SoftmaxCrossEntropy", "sum, class weights",
         lambda: (L.SoftmaxCrossEntropy(reduction="sum", class_weight=[1, 2, 0.5, 1]), (images(2, 4, 5, 6), labels))),
        ("SigmoidBinaryCrossEntropy", "mean",
         lambda: (L.SigmoidBinaryCrossEntropy(), (images(2, 1, 5, 6), labels % 2))),
    ]
    return cases


def run_suite(mode: str = "elementwise", tol: float = 1e-6, seed: int = 0):
    """Check every layer of :func:`layer_suite`; returns ``(rows, all_passed)``.

    Each row: (layer, configuration, tensor, max relative error, 'ok' or 'FAIL').
    """
    rows, passed = [], True
    for name, config, factory in layer_suite(seed):
        layer, inputs = factory()
        report = check_layer(layer, *inputs, mode=mode, tol=tol, seed=seed)
        for t in report.tensors:
            rows.append((name, config, t.name, t.max_rel_err, "ok" if t.passed else "FAIL"))
        passed &= report.passed
    return rows, passed
