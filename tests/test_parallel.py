"""minifcn.parallel: band threads, the BLAS limit, and MINIFCN_NUM_THREADS."""
from __future__ import annotations

import threading
import types

import numpy as np
import pytest

from minifcn import parallel

needs_blas_limit = pytest.mark.skipif(parallel._blas_controller() is None,
                                      reason="threadpoolctl is missing or finds no BLAS it can limit")


def _record(bands, workers):
    seen, lock = [], threading.Lock()

    def work(worker, r0, r1):
        with lock:
            seen.append((worker, r0, r1, threading.get_ident()))

    parallel.run_bands(bands, work, workers)
    return seen


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
def test_every_band_runs_once_on_its_worker(workers):
    bands = [(r, r + 2) for r in range(0, 22, 2)]
    seen = _record(bands, workers)
    assert sorted((r0, r1) for _, r0, r1, _ in seen) == bands
    index = {band: b for b, band in enumerate(bands)}
    assert all(worker == index[(r0, r1)] % workers for worker, r0, r1, _ in seen)
    # worker 0 is the calling thread; each worker is one thread
    assert {t for w, *_, t in seen if w == 0} == {threading.get_ident()}
    for w in range(workers):
        assert len({t for ww, *_, t in seen if ww == w}) == 1


def test_bands_run_from_inside_a_band_stay_in_that_thread():
    """Nested band loops (work that runs bands itself) cannot deadlock the pool: they run where they are."""
    calls = []

    def outer(worker, r0, r1):
        inner = []
        parallel.run_bands([(0, 1), (1, 2), (2, 3)], lambda w, a, b: inner.append((w, threading.get_ident())), 2)
        calls.append(inner == [(0, threading.get_ident())] * 3)

    parallel.run_bands([(r, r + 1) for r in range(6)], outer, 2)
    assert calls == [True] * 6
    assert len(_record([(r, r + 1) for r in range(4)], 2)) == 4  # the pool still works afterwards


def test_one_worker_runs_in_order_in_the_calling_thread():
    bands = [(0, 3), (3, 5), (5, 9)]
    seen = _record(bands, 1)
    assert [(r0, r1) for _, r0, r1, _ in seen] == bands
    assert {t for *_, t in seen} == {threading.get_ident()}


@needs_blas_limit
@pytest.mark.parametrize("failing_worker", [0, 1])
def test_an_error_in_a_band_reaches_the_caller_and_the_pool_survives(failing_worker):
    def work(worker, r0, r1):
        if worker == failing_worker and r0 == 4:
            raise ZeroDivisionError(f"band {r0}")

    bands = [(r, r + 1) for r in range(8)]  # band 4 is on worker 0 of 2, and on worker 1 of 3
    with pytest.raises(ZeroDivisionError, match="band 4"):
        parallel.run_bands(bands, work, 2 if failing_worker == 0 else 3)
    assert len(_record(bands, 2)) == 8


@needs_blas_limit
def test_blas_holds_one_thread_while_workers_run_and_gets_its_threads_back():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    inside = []
    parallel.run_bands([(0, 1), (1, 2)], lambda w, r0, r1: inside.append(blas_threads()), 2)
    assert inside and all(t == [1] * len(before) for t in inside)
    assert blas_threads() == before


@needs_blas_limit
def test_band_loops_from_two_user_threads_leave_blas_as_it_was():
    """Overlapping band loops (two models trained in two threads) share one BLAS limit;
    the last to finish restores the original thread count, not the other's limit."""
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads()
    inside, release = threading.Event(), threading.Event()

    def slow_band(worker, r0, r1):
        if worker == 0:  # the user thread itself waits; the pool stays free
            inside.set()
            release.wait(5)

    user = threading.Thread(target=parallel.run_bands, args=([(0, 1), (1, 2)], slow_band, 2))
    user.start()
    assert inside.wait(5)
    users = []
    parallel.run_bands([(0, 1), (1, 2)], lambda w, r0, r1: users.append(parallel._state["blas_users"]), 2)
    assert users == [2, 2]  # both loops hold the limit
    release.set()
    user.join(5)
    assert parallel._state["blas_users"] == 0
    assert blas_threads() == before


def test_num_threads_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    assert parallel.num_threads() == 3
    monkeypatch.delenv("MINIFCN_NUM_THREADS")
    assert parallel.num_threads() >= 1
    for bad in ("0", "-2", "two", "1.5"):
        monkeypatch.setenv("MINIFCN_NUM_THREADS", bad)
        with pytest.raises(ValueError, match=f"MINIFCN_NUM_THREADS.*{bad!r}"):
            parallel.num_threads()


def test_workers_only_for_several_images_and_bands_of_numpy_arrays(monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "4")
    fake_cupy = types.SimpleNamespace(__name__="cupy")
    assert parallel.workers_for(fake_cupy, 40, 8) == 1
    assert parallel.workers_for(np, 40, 1) == 1                      # one image: BLAS shares its product
    assert parallel.workers_for(np, parallel.MIN_BANDS - 1, 8) == 1   # too little work
    expected = 1 if parallel._blas_controller() is None else 4
    assert parallel.workers_for(np, 40, 8) == expected
    assert parallel.workers_for(np, 3, 8) == min(expected, 3)        # never more workers than bands
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "1")
    assert parallel.workers_for(np, 40, 8) == 1


def test_without_a_blas_limit_bands_run_in_one_thread(monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "4")
    monkeypatch.setitem(parallel._state, "blas", False)
    assert parallel.workers_for(np, 40, 8) == 1


@pytest.mark.parametrize("shape,axis", [((7, 3, 4, 4), 0), ((1, 5, 4, 4), 1), ((2, 9, 3, 3), 0), ((10,), 0)])
def test_pieces_cut_the_batch_or_the_channels_into_views_that_tile(shape, axis, monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    monkeypatch.setattr(parallel, "MIN_PIECE_BYTES", 0)
    a = np.zeros(shape)
    idx = parallel.pieces(np, shape, a.nbytes)
    assert len(idx) == min(3, shape[axis])
    for i in idx:
        assert np.shares_memory(a[i], a)
        a[i] += 1
    np.testing.assert_array_equal(a, 1)  # every element in exactly one piece
    sizes = [a[i].shape[axis] for i in idx]
    assert max(sizes) - min(sizes) <= 1


def test_small_or_gpu_work_is_one_piece(monkeypatch):
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "4")
    assert parallel.pieces(np, (8, 8, 100, 100), parallel.MIN_PIECE_BYTES - 1) == [(Ellipsis,)]
    assert parallel.pieces(types.SimpleNamespace(__name__="cupy"), (8, 8, 100, 100), 1 << 30) == [(Ellipsis,)]
    assert parallel.pieces(np, (1, 1, 500, 500), 1 << 30) == [(Ellipsis,)]  # nothing to cut along
    assert len(parallel.pieces(np, (8, 8, 100, 100), 1 << 30)) == 4
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "1")
    assert parallel.pieces(np, (8, 8, 100, 100), 1 << 30) == [(Ellipsis,)]
