"""minifcn.routes: the mode switch (environment and context manager), its errors, and the one selection."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import minifcn
from minifcn import optim, routes  # noqa: F401 (optim registers the SGD routes)
from minifcn.layers import Conv2d


def test_default_is_fast_and_the_environment_switches(monkeypatch):
    monkeypatch.delenv("MINIFCN_ROUTE", raising=False)
    assert routes.mode() == "fast"
    monkeypatch.setenv("MINIFCN_ROUTE", "textbook")
    assert routes.mode() == "textbook"
    with minifcn.route("fast"):  # the context manager wins over the environment
        assert routes.mode() == "fast"
    assert routes.mode() == "textbook"


def test_unknown_route_names_are_refused_with_the_choices(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown route 'naive' \(minifcn.route\); choose one of textbook, fast"):
        with minifcn.route("naive"):
            pass
    monkeypatch.setenv("MINIFCN_ROUTE", "Textbook")
    with pytest.raises(ValueError, match=r"unknown route 'Textbook' \(MINIFCN_ROUTE\)"):
        Conv2d(1, 1, 3)(np.zeros((1, 1, 4, 4), np.float32))


def test_the_mode_is_per_thread(monkeypatch):
    monkeypatch.delenv("MINIFCN_ROUTE", raising=False)
    seen = []
    with minifcn.route("textbook"):
        thread = threading.Thread(target=lambda: seen.append(routes.mode()))
        thread.start()
        thread.join()
        assert routes.mode() == "textbook"
    assert seen == ["fast"]


def test_select_takes_the_first_fast_route_that_applies_else_the_textbook(monkeypatch):
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    monkeypatch.setattr(routes, "_TEXTBOOK", {})
    monkeypatch.setattr(routes, "_FAST", {})

    @routes.register("double", "textbook", textbook=True, reason="x + x")
    def textbook(x):
        return x + x

    @routes.register("double", "even", applies=lambda x: x % 2 == 0, reason="even: a shift")
    def even(x):
        return x << 1

    assert routes.select("double", 4).name == "even" and routes.select("double", 3).name == "textbook"
    assert routes.run("double", (4,), 4) == 8 and routes.run("double", (3,), 3) == 6
    with minifcn.route("textbook"):
        assert routes.select("double", 4).name == "textbook"
    assert [r.name for r in routes.routes("double")] == ["even", "textbook"]
    with pytest.raises(ValueError, match="already registered"):
        routes.register("double", "even")(even)
    with pytest.raises(KeyError, match="no routes registered for 'triple'"):
        routes.select("triple", 1)


def test_run_hands_the_layers_memo_only_to_routes_that_take_it(monkeypatch):
    """``uses_memo`` (and every data-dependent route) gets ``memo=``; other routes never see it."""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")
    monkeypatch.setattr(routes, "_TEXTBOOK", {})
    monkeypatch.setattr(routes, "_FAST", {})
    seen = []

    @routes.register("op", "textbook", textbook=True, reason="plain")
    def plain(x):
        return x

    @routes.register("op", "keeps", applies=lambda x: x == 1, reason="keeps something", uses_memo=True)
    def keeps(x, memo=None):
        seen.append(("keeps", memo))
        return x

    @routes.register("op", "looks", applies=lambda x: x == 2, reason="looks at the data", data_dependent=True)
    def looks(x, memo=None):
        seen.append(("looks", memo))
        return x

    memo = {}
    for x in (1, 2, 3):
        assert routes.run("op", (x,), x, memo=memo) == x      # the textbook route (x = 3) takes no memo=
    assert seen == [("keeps", memo), ("looks", memo)] and all(m is memo for _, m in seen)
    routes.run("op", (1,), 1)                                  # no memo given: none passed
    assert seen[-1] == ("keeps", None)


def test_every_operation_has_a_textbook_route():
    for op in ("conv_forward", "conv_input_grad", "conv_weight_grad", "maxpool_forward", "maxpool_input_grad",
               "sgd_update"):
        assert routes.textbook(op).name == "textbook"
        assert all(r.reason for r in routes.routes(op)), op
