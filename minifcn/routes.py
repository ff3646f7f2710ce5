"""Routes: the named implementations of one operation, and the one place that chooses between them.

Every linear operation with more than one implementation (convolution forward,
input gradient and weight gradient, max pooling forward and backward, the SGD
update, zeroing a gradient) has a *textbook* route, the maths as a student writes it, and fast
routes, each a named function with an applicability rule and a one-line
reason. :func:`select` is the only place that picks one:

* in ``"textbook"`` mode, always the textbook route;
* in ``"fast"`` mode (the default), the first registered fast route whose rule
  holds for the geometry, else the textbook route.

Choose the mode with the environment variable ``MINIFCN_ROUTE=textbook|fast``
or, inside a program, ``with minifcn.route("textbook"): ...`` (per thread:
another thread keeps its own mode). ``minifcn explain routes`` prints which
route each layer of a model takes and why, by calling :func:`select` too.

Adding a route: decorate its function with
``@register(op, name, applies=rule, reason="...")``. Routes are tried in the
order they were registered; the tests compare every route with the textbook one.
A route whose shortcut depends on the data as well as the geometry (runs of
identical lines, :mod:`minifcn.layers.line_runs`) is registered with
``data_dependent=True`` and hands the work to the next route where the data
offers none (``run(..., skip=(its name,))``); ``minifcn explain routes`` names both.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Callable

MODES = ("textbook", "fast")
_override = contextvars.ContextVar("minifcn_route", default=None)


@dataclass
class Route:
    """One implementation of ``op``: ``fn`` computes it; ``applies(*facts)`` says
    whether it may run on a geometry; ``reason`` says why it is chosen there."""

    op: str
    name: str
    fn: Callable
    applies: Callable
    reason: str
    data_dependent: bool = False  # the shortcut also needs something of the data: without it, the next route runs
    uses_memo: bool = False       # reads or writes the layer's memo (data-dependent routes always do)


_TEXTBOOK: dict = {}  # op -> Route
_FAST: dict = {}      # op -> [Route, ...] in order of preference


def _check_mode(name, source):
    if name not in MODES:
        raise ValueError(f"unknown route {name!r} ({source}); choose one of {', '.join(MODES)}")
    return name


def mode() -> str:
    """The route mode in force here: ``route(...)``'s, else ``MINIFCN_ROUTE``'s, else ``"fast"``."""
    name = _override.get()
    if name is not None:
        return name
    value = os.environ.get("MINIFCN_ROUTE", "").strip()
    return _check_mode(value, "MINIFCN_ROUTE") if value else "fast"


@contextlib.contextmanager
def route(name: str):
    """``with route("textbook"):`` forces the textbook route of every operation in this thread."""
    token = _override.set(_check_mode(name, "minifcn.route"))
    try:
        yield
    finally:
        _override.reset(token)


def register(op: str, name: str, applies: Callable | None = None, reason: str = "", textbook: bool = False,
             data_dependent: bool = False, uses_memo: bool = False):
    """Decorator: register ``fn`` as route ``name`` of ``op`` (the textbook one if ``textbook``).
    ``data_dependent``: ``fn`` looks at the data too, and hands over to ``select(..., skip=(name,))``
    where the data offers no shortcut. ``uses_memo``: ``fn`` takes the layer's memo (``memo=``, see
    :func:`run`) to keep something from one pass for another; data-dependent routes always do."""
    def decorate(fn):
        entry = Route(op, name, fn, applies or (lambda *facts: True), reason, data_dependent,
                      uses_memo or data_dependent)
        if textbook:
            _TEXTBOOK[op] = entry
        else:
            fast = _FAST.setdefault(op, [])
            if any(r.name == name for r in fast):
                raise ValueError(f"route {name!r} of {op!r} is already registered")
            fast.append(entry)
        return fn
    return decorate


def routes(op: str) -> list:
    """Every route of ``op``: the fast ones in order of preference, then the textbook one."""
    if op not in _TEXTBOOK:
        raise KeyError(f"no routes registered for {op!r}; known: {', '.join(sorted(_TEXTBOOK))}")
    return list(_FAST.get(op, [])) + [_TEXTBOOK[op]]


def select(op: str, *facts, skip: tuple = ()) -> Route:
    """THE selection: the route of ``op`` that runs on this geometry (``facts``) in the current mode.

    ``skip`` names fast routes not to try: a route whose shortcut depends on the
    data, not only on the geometry, hands over to the others so when the data
    offers none, and a caller whose data never offers it says so.
    """
    if mode() == "fast":
        for candidate in _FAST.get(op, []):
            if candidate.name not in skip and candidate.applies(*facts):
                return candidate
    return routes(op)[-1]


ACROSS_CALLS = "kept across calls"  # the key of a layer's memo that lasts across its calls (see run)


def run(op: str, facts: tuple, *args, skip: tuple = (), memo: dict | None = None, **kwargs):
    """``select(op, *facts, skip=skip).fn(*args, **kwargs)``: what a layer calls.

    ``memo``: a dict a layer keeps from its forward to its backward. A route registered
    with ``uses_memo`` (every data-dependent one) gets it (``memo=``) to keep what the
    backward can reuse: what it found out about the layer's input (the runs of repeated
    lines), or the forward's columns; other routes never see it. ``memo[ACROSS_CALLS]``,
    where the layer puts one, is a dict the layer keeps across its calls: what a route
    found in earlier inputs, as hints it checks against the data before using them
    (never trusted as they are), and buffers it reuses.
    """
    chosen = select(op, *facts, skip=skip)
    if memo is not None and chosen.uses_memo:
        kwargs["memo"] = memo
    return chosen.fn(*args, **kwargs)


def textbook(op: str) -> Route:
    """The textbook route of ``op``."""
    return routes(op)[-1]
