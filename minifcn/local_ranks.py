"""Data-parallel ranks as processes of this machine, started by minifcn itself (``minifcn train --ranks N``).

One training process at batch 1 keeps about one core busy: the products share
both cores, but the element-wise passes, the runs of repeated lines and the
Python between them run on one (benchmarks/RESULTS.md). Two processes that
each train on their own image use both, and take the step of a global batch of
2 in little more time than one process takes for 1 (the two share the memory
bandwidth). Threads would share one Python interpreter, and the GIL held
between NumPy calls costs much of that gain.

So :func:`run` starts N processes (``multiprocessing``, the ``spawn`` start
method: no state of the parent is copied), and each runs the training loop
as one rank of a data-parallel job, exactly as under ``mpiexec -n N``
(:mod:`minifcn.distributed`): same shards, same gradient average, same
checkpoints written by rank 0. Only the communicator differs:
:class:`SharedMemoryCommunicator` has the methods of
:class:`minifcn.distributed.SingleProcess` and does them through

* one shared-memory block of two *sets* of slots, a slot of ``SLOT_BYTES`` per
  rank in each, for sums and array broadcasts (the hot path: one gradient
  average per step), and
* a pipe from rank 0 to each other rank, for the few Python objects (the
  start-up check, the history on resume).

A sum (``allreduce_sum_``), chunk by chunk of at most a slot (less its tail of
``EXTRA_BYTES``), each chunk in the next set (``turn``: 0, 1, 0, ...)::

    every rank r copies its chunk into slot r of the set       barrier
    rank r adds up its own part (1/N of the chunk) of every
    slot in rank order (slot 0 + slot 1 + ...), into slot 0   barrier
    every rank copies slot 0 back into its array

so every rank gets the same bits, and for two ranks the bits MPI's sum gives.
No barrier is needed after the copy back: the next chunk goes to the other set,
and a rank writes into this set again only after the next chunk's first
barrier, which no rank passes before every rank has finished copying back.
Under load every barrier is a chance to wait for a descheduled rank; two sets
make two barriers a chunk where one set needs three. For the same reason the
step's loss rides with its gradient average (``allreduce_mean_and_sum_``): a
few float64 values in the last ``EXTRA_BYTES`` of each slot, added up by rank
0 in the same two barriers (a separate sum took two more: beside one busy
process the short run took 1.74x its time alone against 1.49x, in alternating
rounds on the Zen 5 AMD EPYC; benchmarks/RESULTS.md).

The barrier is :class:`RankBarrier`, a semaphore for each ordered pair of
ranks with a short spin before sleeping: a wait of ``multiprocessing.Barrier``
(a condition variable over several semaphores) took several times as long,
and a training step waits a few times (benchmarks/RESULTS.md).

Each process holds ``cores // N`` BLAS threads and band threads, as
``mpiexec`` ranks do, and is pinned to its own ``cores // N`` cores
(:func:`cores_of_rank`; ``MINIFCN_PIN_RANKS=0`` turns it off). A rank that fails sends its exception to the parent,
which stops the others and raises it; checkpoints are atomic, so the last good
one survives. Ctrl-C stops every rank, and a rank ends when the parent does
(even one killed outright).
"""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
import traceback
from contextlib import contextmanager
from multiprocessing import connection, shared_memory

import numpy as np

from .backend import get_array_module, to_numpy
from .distributed import BUCKET_BYTES, SingleProcess, _GradientAverager, _pack, _unpack

SLOT_BYTES = 16 << 20  # per rank and set; a larger sum runs in chunks of this (the small FCN-8s's gradient: one)
SETS = 2               # sets of slots, used in turn (the module docstring says why two)
EXTRA_BYTES = 4096     # the tail of each slot: float64 values summed with a gradient average (the step's loss)
SPIN_TRIES = 100       # RankBarrier: non-blocking tries (microseconds in all) before a rank sleeps on a semaphore
ABORT_POLL_S = 0.1     # RankBarrier: how often a sleeping rank looks whether the barrier was aborted
STOP_GRACE_S = 2.0     # after a rank failed: how long the others may take to stop on their own before being ended
PIN_VARIABLE = "MINIFCN_PIN_RANKS"  # "0": the ranks are not pinned to cores (see cores_of_rank)
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MINIFCN_NUM_THREADS")


class RankFailed(RuntimeError):
    """A rank's process ended without a result (killed, or out of memory)."""


class RankBarrier:
    """A barrier of ``size`` processes: one semaphore per ordered pair of ranks, a short spin, then sleep.

    Rank r arrives by giving a token to every other rank (releasing semaphore
    ``(r, k)``), then takes one token from every other rank (acquiring
    ``(k, r)``): it passes once all have arrived. Tokens are counted, so one
    given early for the next wait is not lost, and the next wait's token of
    rank k cannot stand in for this one's: k gives it only after passing this
    wait itself. A rank first tries ``spin_tries`` times without blocking
    (the other rank is often microseconds away), then sleeps; with more ranks
    than cores a spinning rank would hold a core another rank needs, and
    :func:`run` passes 0.

    :meth:`abort` (a failed rank, or the parent) marks the barrier broken: a
    rank in :meth:`wait`, or arriving later, raises
    ``threading.BrokenBarrierError`` within ``ABORT_POLL_S``, as a rank in an
    aborted ``multiprocessing.Barrier`` does. Made in the parent and passed to
    the ranks as a :class:`multiprocessing.Process` argument.
    """

    def __init__(self, size: int, context, spin_tries: int = SPIN_TRIES):
        self.size, self.spin_tries = int(size), int(spin_tries)
        self._tokens = [[context.Semaphore(0) if giver != taker else None for taker in range(self.size)]
                        for giver in range(self.size)]
        self._broken = context.RawValue("b", 0)

    def wait(self, rank: int) -> None:
        """Return once every rank has called ``wait`` as often as ``rank`` has."""
        if self._broken.value:
            raise threading.BrokenBarrierError
        for other in range(self.size):
            if other != rank:
                self._tokens[rank][other].release()
        for other in range(self.size):
            if other != rank:
                self._take(self._tokens[other][rank])

    def _take(self, token) -> None:
        for _ in range(self.spin_tries):
            if token.acquire(False):
                return
        while not token.acquire(timeout=ABORT_POLL_S):
            if self._broken.value:
                raise threading.BrokenBarrierError

    def abort(self) -> None:
        """Break the barrier: every rank waiting in it, or coming to it later, raises BrokenBarrierError."""
        self._broken.value = 1


class SharedMemoryCommunicator(SingleProcess):
    """Rank ``rank`` of ``size`` processes of one machine: the communicator of :mod:`minifcn.distributed`
    on shared memory and pipes (see the module docstring)."""

    name = "processes of this machine"

    def __init__(self, rank: int, size: int, block_name: str, barrier, pipes, messages):
        self.rank, self.size = rank, size
        self.local_rank, self.local_size = rank, size
        self._block = shared_memory.SharedMemory(name=block_name)
        self._barrier, self._pipes, self._messages = barrier, pipes, messages
        self.name = f"{size} processes of this machine"
        self._turn = 0  # chunks moved so far: chunk t uses set t % SETS (the same t on every rank)

    def _next_set(self) -> int:
        used, self._turn = self._turn % SETS, self._turn + 1
        return used

    def _slot(self, rank: int, dtype, count: int, which: int):
        """The first ``count`` items of ``rank``'s slot in set ``which``, as ``dtype``."""
        offset = (which * self.size + rank) * SLOT_BYTES
        return np.ndarray((count,), dtype=dtype, buffer=self._block.buf, offset=offset)

    def _wait(self):
        self._barrier.wait(self.rank)

    # -- sums ---------------------------------------------------------------------
    def allreduce_sum_(self, array):
        return self._allreduce_(array, None)

    def allreduce_mean_(self, array):
        # Each rank multiplies its own part of the sum while it is in cache, before the copy back: the
        # bits of allreduce_sum_ then `array *= factor`, one pass over the array fewer.
        return self._allreduce_(array, array.dtype.type(1.0 / self.size))

    def allreduce_mean_and_sum_(self, array, extra):
        # The float64 values ride in the tail of the last chunk's slots: two barriers for both, not four.
        extra = np.asarray(extra, dtype=np.float64).reshape(-1)
        if extra.nbytes > EXTRA_BYTES:
            raise ValueError(f"allreduce_mean_and_sum_: at most {EXTRA_BYTES // 8} extra values, got {extra.size}")
        totals = np.empty_like(extra)
        self._allreduce_(array, array.dtype.type(1.0 / self.size), (extra, totals))
        return totals

    def _allreduce_(self, array, factor, extra=None):
        """The sum over the ranks, times ``factor`` unless None, in place (module docstring). With
        ``extra = (values, totals)``, the sum of the float64 ``values`` over the ranks goes into ``totals``,
        carried in the tail of the last chunk's slots (``EXTRA_BYTES`` past the chunk's room) and added up
        by rank 0, in rank order."""
        xp = get_array_module(array)
        if not array.flags.c_contiguous:
            raise ValueError(f"allreduce_sum_: need a contiguous array, got strides {array.strides}")
        host = array if xp is np else to_numpy(array)
        flat = host.reshape(-1)
        per = (SLOT_BYTES - EXTRA_BYTES) // flat.dtype.itemsize
        starts = range(0, max(flat.size, 1 if extra is not None else 0), per)  # extra values need one chunk
        for start in starts:
            chunk = flat[start:start + per]
            n, which = chunk.size, self._next_set()
            last = extra is not None and start == starts[-1]
            self._slot(self.rank, chunk.dtype, n, which)[...] = chunk
            if last:
                self._tail(self.rank, extra[0].size, which)[...] = extra[0]
            self._wait()
            lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
            total = self._slot(0, chunk.dtype, n, which)[lo:hi]
            for other in range(1, self.size):  # in rank order: the same bits on every rank
                total += self._slot(other, chunk.dtype, n, which)[lo:hi]
            if factor is not None:
                total *= factor
            if last and self.rank == 0:
                tail = self._tail(0, extra[0].size, which)
                for other in range(1, self.size):
                    tail += self._tail(other, extra[0].size, which)
            self._wait()
            chunk[...] = self._slot(0, chunk.dtype, n, which)  # no barrier after: the next chunk takes the other set
            if last:
                extra[1][...] = self._tail(0, extra[0].size, which)
        if xp is not np:
            array[...] = xp.asarray(host)
        return array

    def _tail(self, rank: int, count: int, which: int):
        """The first ``count`` float64 values of the last ``EXTRA_BYTES`` of ``rank``'s slot in set ``which``."""
        offset = (which * self.size + rank + 1) * SLOT_BYTES - EXTRA_BYTES
        return np.ndarray((count,), dtype=np.float64, buffer=self._block.buf, offset=offset)

    def allreduce_sum(self, array):
        return self.allreduce_sum_(np.array(array, copy=True))

    def gradient_averager(self, params, route: str = "buckets", bucket_bytes: int = BUCKET_BYTES):
        return _GradientAverager(self, params, route, bucket_bytes)

    # -- broadcasts -----------------------------------------------------------------
    def broadcast_arrays(self, arrays) -> None:
        arrays = list(arrays)
        packed = _pack(arrays)
        for dtype in sorted(packed, key=str):
            flat = packed[dtype]
            per = SLOT_BYTES // flat.dtype.itemsize
            for start in range(0, flat.size, per):
                chunk, which = flat[start:start + per], self._next_set()  # in turn with the sums' chunks
                if self.rank == 0:
                    self._slot(0, chunk.dtype, chunk.size, which)[...] = chunk
                self._wait()
                if self.rank > 0:
                    chunk[...] = self._slot(0, chunk.dtype, chunk.size, which)
        _unpack(packed, arrays)

    def broadcast_object(self, value):
        if self.rank == 0:
            for pipe in self._pipes:
                pipe.send(value)
            return value
        return self._pipes[0].recv()

    def gather_objects(self, value):
        if self.rank == 0:
            return [value] + [pipe.recv() for pipe in self._pipes]
        self._pipes[0].send(value)
        return None

    def barrier(self) -> None:
        self._wait()

    def bind_device(self, device: str) -> None:
        if device != "gpu":
            return
        import cupy  # noqa: PLC0415 (only for device 'gpu')

        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()

    def log(self, *args, **kwargs) -> None:
        """Rank 0's log lines go to the parent, which prints them with its own ``log``; the others' are dropped
        (as under mpiexec, rank 0 alone speaks)."""
        if self.rank == 0:
            self._messages.send(("log", " ".join(str(a) for a in args)))

    def close(self) -> None:
        self._block.close()


def threads_per_rank(size: int) -> int:
    """The CPU threads each of ``size`` ranks may use: the cores this process may use, shared out."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // size)


def cores_of_rank(rank: int, size: int, cores=None):
    """The cores rank ``rank`` of ``size`` is pinned to: its own ``len(cores) // size`` of the cores this
    process may use (``cores``, default its affinity), or None (not pinned) where there are fewer cores
    than ranks, on a system without affinities, or with ``MINIFCN_PIN_RANKS=0``.

    Why: two ranks step in lockstep, and beside another busy process the scheduler otherwise moves
    them, sometimes onto one core together; pinned, it moves the other process instead. Beside one busy
    process that made the run shorter, and alone it changed nothing (benchmarks/RESULTS.md, "Pinned
    ranks"). ``MINIFCN_PIN_RANKS`` other than ``0``, ``1`` or unset is refused by name. Two jobs
    started at once on one machine take the same cores for their rank r: run them with
    ``MINIFCN_PIN_RANKS=0``, or give each its own cores (``taskset``), whose share is then pinned.
    """
    setting = os.environ.get(PIN_VARIABLE, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{PIN_VARIABLE} must be 0 (ranks not pinned to cores) or 1 (pinned, the default), "
                         f"got {setting!r}")
    if setting == "0":
        return None
    if cores is None:
        try:
            cores = os.sched_getaffinity(0)
        except AttributeError:  # not on Linux
            return None
    cores = sorted(cores)
    share = len(cores) // size
    if share < 1:
        return None
    return set(cores[rank * share:(rank + 1) * share])


@contextmanager
def _child_environment(size: int):
    """Thread counts for the children: ``cores // size`` each, unless the user set them (read by
    BLAS when a child imports NumPy, so they are set in this process's environment while it starts them)."""
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    share = str(threads_per_rank(size))
    for name in THREAD_VARIABLES:
        os.environ.setdefault(name, share)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _end_with_the_parent() -> None:
    """End this process as soon as the parent ends: a parent killed outright (SIGKILL) cannot stop its
    children, and a rank left alone would wait in a barrier forever or, as rank 0, go on writing the run."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch():
        connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="minifcn-parent-watch", daemon=True).start()


def _rank_main(rank, size, block_name, barrier, pipes, messages, target, args, cores):
    """The body of one rank's process: ``target(comm, *args)``, on ``cores`` (all the parent's if None);
    its result or exception goes to the parent."""
    _end_with_the_parent()
    if cores is not None:
        os.sched_setaffinity(0, cores)
    comm = SharedMemoryCommunicator(rank, size, block_name, barrier, pipes, messages)
    try:
        result = target(comm, *args)
        messages.send(("done", result if rank == 0 else None))
    except KeyboardInterrupt:
        messages.send(("interrupted", None))
    except BaseException as exc:  # noqa: BLE001 (everything goes to the parent, which raises it)
        detail = traceback.format_exc()
        try:
            messages.send(("error", exc, detail))
        except Exception:  # noqa: BLE001 (an exception that does not pickle: send its text)
            messages.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), detail))
        barrier.abort()  # the others, waiting in a sum, stop (their BrokenBarrierError is not reported)
    finally:
        comm.close()


def run(size: int, target, *args, log=print):
    """Run ``target(comm, *args)`` in ``size`` processes, ``comm`` a :class:`SharedMemoryCommunicator`;
    returns rank 0's result.

    ``target`` and ``args`` must be picklable (a module-level function, plain
    data). Rank 0 may call ``comm.log(line)``: the line is passed to ``log``
    here. A rank's exception is raised here (the first one that is not
    another rank's broken barrier) after every rank has stopped;
    :class:`RankFailed` if a process ended without saying why.
    """
    if int(size) != size or size < 1:
        raise ValueError(f"ranks must be a positive integer, got {size!r}")
    cores = [cores_of_rank(rank, size) for rank in range(size)]  # a bad MINIFCN_PIN_RANKS stops it here
    context = multiprocessing.get_context("spawn")
    block = shared_memory.SharedMemory(create=True, size=SETS * size * SLOT_BYTES)
    barrier = RankBarrier(size, context, SPIN_TRIES if threads_per_rank(1) >= size else 0)  # a core each: spin
    ends = [context.Pipe() for _ in range(size - 1)]  # rank 0 <-> rank r
    reports = [context.Pipe(duplex=False) for _ in range(size)]  # rank r -> here
    processes = []
    try:
        with _child_environment(size):
            for rank in range(size):
                pipes = [a for a, _ in ends] if rank == 0 else [ends[rank - 1][1]]
                process = context.Process(target=_rank_main, name=f"minifcn-rank-{rank}", daemon=True,
                                          args=(rank, size, block.name, barrier, pipes, reports[rank][1], target,
                                                args, cores[rank]))
                process.start()
                processes.append(process)
        for a, b in ends:  # only the children hold them now: a rank that dies closes its end for good
            a.close()
            b.close()
        for _, sender in reports:
            sender.close()
        return _collect(processes, [receiver for receiver, _ in reports], barrier, log)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
        block.close()
        block.unlink()


def _collect(processes, receivers, barrier, log):
    """Wait for every rank's report; pass log lines on; returns rank 0's result or raises the failure."""
    results, errors, interrupted = {}, [], False
    open_ = dict(enumerate(receivers))
    deadline = None
    try:
        while open_:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = connection.wait(list(open_.values()), timeout=timeout)
            if not ready:  # the grace after a failure is over
                break
            for rank in [r for r, c in open_.items() if c in ready]:
                try:
                    kind, *payload = open_[rank].recv()
                except EOFError:  # the process ended without a report
                    del open_[rank]
                    processes[rank].join(1.0)
                    if rank not in results:
                        errors.append((rank, RankFailed(f"rank {rank} of {len(processes)} ended with exit code "
                                                        f"{processes[rank].exitcode} before it finished"), ""))
                    continue
                if kind == "log":
                    log(payload[0])
                elif kind == "done":
                    results[rank] = payload[0]
                elif kind == "interrupted":
                    interrupted = True
                    results[rank] = None
                else:
                    errors.append((rank, payload[0], payload[1] if len(payload) > 1 else ""))
            if (errors or interrupted) and deadline is None:
                deadline = time.monotonic() + STOP_GRACE_S
                barrier.abort()
    except KeyboardInterrupt:
        interrupted = True
    real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)]
    if real:
        rank, exc, detail = real[0]
        if hasattr(exc, "add_note"):  # Python 3.11+
            exc.add_note(f"(on rank {rank} of {len(processes)})")
        if isinstance(exc, (RankFailed,)) or not detail:
            raise exc
        raise exc from _RemoteTraceback(detail)
    if interrupted or errors:
        raise KeyboardInterrupt
    return results.get(0)


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a rank's process (shown as its cause)."""

    def __str__(self):
        return "\n" + self.args[0]
