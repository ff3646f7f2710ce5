"""Every CPU core at work: a small thread pool for convolution bands and element-wise pieces.

The fast convolution routes (:mod:`minifcn.layers.conv_fast`) run band by band
(:mod:`minifcn.layers.columns`): unfold a few output rows of every image into
columns that stay in cache, multiply, move on. Each band is one small product
per image (16 x 144 by 144 x 786 for the 16-channel 3x3 layers of the small
benchmark model), and OpenBLAS shares such products between cores badly: two
Python threads each running half of them on one BLAS thread beat two BLAS
threads (measured: ``benchmarks/RESULTS.md``). So on the CPU the bands are handed out to threads,
band ``b`` to worker ``b % workers``, while BLAS is held at one thread per call.
NumPy releases the GIL inside its copies and matrix products, so the workers
run at the same time; the calling thread is worker 0.

* ``MINIFCN_NUM_THREADS`` sets the number of workers (default: the CPUs this
  process may use); ``1`` turns them off.
* Holding BLAS at one thread needs ``threadpoolctl`` (a dependency). Where it is
  missing or finds no BLAS it can limit, the bands run one after the other:
  threads on top of a multi-threaded BLAS would only compete. While a band
  loop runs, the limit holds for the whole process.
* CuPy arrays never come here: a GPU runs each convolution as one band.

Memory-bound element-wise layers (ReLU, max pooling) use the same pool
without touching BLAS: :func:`pieces` cuts arrays of ``MIN_PIECE_BYTES`` or more
into one view per worker, along the batch (or the channels when N = 1), and
:func:`run_pieces` runs them.

Outputs are the same for any number of workers. Weight gradients are summed
per worker, then in worker order: they differ between worker counts by float
rounding only, and not at all between runs with the same count.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

MIN_BANDS = 3                # fewer bands run in the calling thread
MIN_PIECE_BYTES = 4 << 20    # element-wise work on less than this runs in the calling thread: handing a
                             # piece to a worker costs about 50 us (from 1 MiB: the recipe's step 0.98 to 0.99)

_state = {"pool": None, "size": 0, "blas": None, "blas_users": 0, "blas_limit": None}
_lock = threading.Lock()
_inside = threading.local()  # .share is True while this thread runs a share of items


def num_threads() -> int:
    """Band threads to use: ``MINIFCN_NUM_THREADS`` if set, else the CPUs available to this process."""
    value = os.environ.get("MINIFCN_NUM_THREADS", "").strip()
    if value:
        try:
            count = int(value)
        except ValueError:
            raise ValueError(f"MINIFCN_NUM_THREADS must be a positive integer, got {value!r}") from None
        if count < 1:
            raise ValueError(f"MINIFCN_NUM_THREADS must be a positive integer, got {value!r}")
        return count
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _blas_controller():
    """threadpoolctl's controller of the BLAS libraries NumPy loaded, or None when it cannot limit any."""
    if _state["blas"] is None:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415

            blas = ThreadpoolController().select(user_api="blas")
            _state["blas"] = blas if blas.lib_controllers else False
        except Exception:  # not installed, or an unexpected library layout
            _state["blas"] = False
    return _state["blas"] or None


def workers_for(xp, n_bands: int, images: int) -> int:
    """How many threads share ``n_bands`` bands of a batch of ``images`` ``xp`` arrays: 1 (the caller runs them) or more.

    Threads pay where a band is many small products: one per image of the
    batch. With one image a band is a single product thousands of columns
    wide, which BLAS already shares between cores well; and a convolution cut
    into only two bands (a 17 x 17 map) is too little work to hand out.
    Both were measured (``benchmarks/RESULTS.md``).
    """
    if xp.__name__ != "numpy" or images < 2 or n_bands < MIN_BANDS:
        return 1
    count = min(num_threads(), n_bands)
    if count < 2 or _blas_controller() is None:
        return 1
    return count


def _pool(size):
    with _lock:
        if _state["size"] < size:
            if _state["pool"] is not None:
                _state["pool"].shutdown(wait=False)
            _state["pool"] = ThreadPoolExecutor(size, thread_name_prefix="minifcn")
            _state["size"] = size
        return _state["pool"]


@contextlib.contextmanager
def _blas_at_one_thread():
    """BLAS at one thread until the last of the overlapping users leaves (band
    loops run from several user threads at once must not restore each other's limit)."""
    blas = _blas_controller()
    if blas is None:
        yield
        return
    with _lock:
        if _state["blas_users"] == 0:
            _state["blas_limit"] = blas.limit(limits=1)  # applies the limit now
        _state["blas_users"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["blas_users"] -= 1
            if _state["blas_users"] == 0:
                _state["blas_limit"].restore_original_limits()
                _state["blas_limit"] = None


def _run(items, call, workers, hold_blas):
    """``call(worker, item)`` for every item, item ``i`` on worker ``i % workers``; the caller is worker 0.

    A call made from inside a share (work that itself runs bands) runs its
    items in its own thread: waiting on the pool from the pool could deadlock.
    """
    items = list(items)
    if workers <= 1 or getattr(_inside, "share", False):
        for item in items:
            call(0, item)
        return

    def run_share(worker):
        _inside.share = True
        try:
            for item in items[worker::workers]:
                call(worker, item)
        finally:
            _inside.share = False

    pool = _pool(workers - 1)
    with _blas_at_one_thread() if hold_blas else contextlib.nullcontext():
        futures = [pool.submit(run_share, worker) for worker in range(1, workers)]
        try:
            run_share(0)
        finally:
            for future in futures:  # all done before the BLAS limit is lifted
                future.exception()
    for future in futures:
        future.result()


def run_bands(bands, work, workers: int) -> None:
    """Call ``work(worker, r0, r1)`` for every ``(r0, r1)`` in ``bands``.

    Band ``b`` runs on worker ``b % workers`` (so each worker can keep its own
    partial sums, indexed by ``worker``; scratch buffers are per thread). With one worker
    the calls are made here, in order; with more, they run on the pool with
    BLAS held at one thread, and the first exception is re-raised here.
    """
    _run(bands, lambda worker, band: work(worker, *band), workers, hold_blas=True)


def pieces(xp, shape, nbytes: int) -> list:
    """Indices that cut arrays of leading shape (N, C, ...) into one piece per worker.

    The cut is along N, or along C when N is 1, so every piece is a view of
    any array with those leading axes (an input, its output, a mask). Work on
    fewer than ``MIN_PIECE_BYTES``, or on CuPy arrays, is one piece: ``[...]``.
    """
    whole = [(Ellipsis,)]
    if xp.__name__ != "numpy" or nbytes < MIN_PIECE_BYTES or len(shape) == 0:
        return whole
    axis = 0 if shape[0] > 1 or len(shape) == 1 else 1
    count = min(num_threads(), shape[axis])
    if count < 2:
        return whole
    edges = [shape[axis] * k // count for k in range(count + 1)]
    return [(slice(None),) * axis + (slice(a, b),) for a, b in zip(edges, edges[1:])]


def run_pieces(indices, work) -> None:
    """Call ``work(index)`` for every index from :func:`pieces`, each on its own worker.

    For memory-bound element-wise layers (ReLU, max pooling): no BLAS is
    involved, so its thread count is left alone.
    """
    _run(indices, lambda worker, index: work(index), len(indices), hold_blas=False)


def _forget_pool_after_fork():
    # A forked child has the pool object but not its threads.
    _state["pool"], _state["size"] = None, 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)
