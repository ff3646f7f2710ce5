"""Data-parallel SGD over MPI: the few collective operations training needs.

``mpiexec -n N minifcn train ...`` starts N copies of the same program. Each
one (a *rank*) holds the whole model, runs forward and backward on its own
part of the global batch, and the ranks then average their parameter
gradients, so that every rank takes the same SGD step, the one a single
process would take on the whole global batch (docs/data_parallel.md).

:func:`world` is the one place that decides which communicator a process
gets:

* :class:`SingleProcess` when the process was not started by an MPI launcher:
  every operation is the identity, nothing is imported, and training runs
  exactly as without this module. So the training loop has no
  ``if distributed:`` branches.
* :class:`MPICommunicator` (a wrapper of ``mpi4py``'s ``MPI.COMM_WORLD``) when
  a launcher started it (``mpiexec`` / ``mpirun`` / ``srun --mpi=pmi2`` set one of
  :data:`LAUNCHER_SIZE_VARIABLES`). mpi4py comes with the optional extra
  ``pip install 'minifcn[mpi]'``; importing minifcn never needs it.

Both have the same methods: ``rank``, ``size``, :meth:`broadcast_arrays`,
:meth:`broadcast_object`, :meth:`gather_objects`, :meth:`allreduce_sum`, :meth:`gradient_averager`,
:meth:`check_same`, :meth:`barrier`, :meth:`abort`, :meth:`bind_device`.

Gradient averaging, two named routes (:data:`GRADIENT_ROUTES`):

* ``"per-parameter"``, the textbook route: one ``Allreduce`` per parameter
  array (about 40 calls a step for FCN-8s).
* ``"buckets"`` (the default): the gradients of the trainable parameters are
  laid out once in a few flat buffers of at most ``bucket_bytes`` each (each
  parameter's ``.grad`` becomes a view into one), so backward writes straight
  into them and a step is one in-place ``Allreduce`` per bucket, with no copy
  and no per-parameter call. Frozen parameters (``trainable=False``, such as
  FCN's fixed bilinear kernels) are left out.

On CuPy arrays the buckets are reduced by NCCL (``cupy.cuda.nccl``) when CuPy
has it, else by passing the device buffers to MPI, which then must be
CUDA-aware; :func:`gpu_route` makes that choice, and ``MINIFCN_GPU_ALLREDUCE``
(``nccl`` or ``mpi``) overrides it. This GPU code follows the CuPy and mpi4py
documentation and has not been run yet (no GPU was available).

Faults: under MPI, a rank that fails must not leave the others waiting in a
collective forever. :meth:`MPICommunicator.abort` prints the failing rank's
message and calls ``MPI_Abort``, which ends every rank; an uncaught exception
does the same (an ``excepthook``, as ``python -m mpi4py`` does). Checkpoints
are written atomically by rank 0, so the last good one survives.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import numpy as np

from .backend import get_array_module, to_numpy
from .optim import ALIGN_BYTES

GRADIENT_ROUTES = ("buckets", "per-parameter")
BUCKET_BYTES = 64 << 20  # gradient bucket cap; Horovod's default fusion buffer is 64 MiB too
ABORT_GRACE_S = 1.0      # between a failing rank's message and MPI_Abort: time for mpiexec to pass the message on

# Environment variables through which MPI launchers tell a process how many ranks the job has:
# MPICH and Intel MPI (Hydra; Slurm's srun --mpi=pmi2 too), Open MPI, MVAPICH. Only whether to load mpi4py is
# decided from them; the job's size and this process's rank come from MPI itself.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

MPI_MISSING = ("this process was started by an MPI launcher ({variable}={size}) but mpi4py cannot be imported "
               "({error}); install the MPI extra: pip install 'minifcn[mpi]' (mpi4py and an MPI runtime)")


class LaunchMismatch(ValueError):
    """The ranks of one job were started with different configurations, data or models."""


def launched_size() -> tuple[str, int] | None:
    """``(variable, N)`` when an MPI launcher started this process as one of N > 1 ranks, else None."""
    for variable in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 1:
            return variable, int(value)
    return None


_WORLD = None


def world():
    """The communicator of this process, made once: :class:`MPICommunicator` under an MPI
    launcher with more than one rank, :class:`SingleProcess` otherwise."""
    global _WORLD
    if _WORLD is None:
        launched = launched_size()
        if launched is None:
            _WORLD = SingleProcess()
        else:
            try:
                from mpi4py import MPI  # noqa: PLC0415 (optional dependency)
            except ImportError as exc:
                raise RuntimeError(MPI_MISSING.format(variable=launched[0], size=launched[1], error=exc)) from None
            _WORLD = MPICommunicator(MPI.COMM_WORLD)
    return _WORLD


def fail(message: str, code: int) -> int:
    """Report a failure of this process: print ``message`` and return ``code`` for its exit; under MPI,
    name the rank and stop every rank of the job (:meth:`MPICommunicator.abort`)."""
    comm = _WORLD
    if comm is None and launched_size() is not None:  # failed before training asked for the communicator
        try:
            comm = world()
        except RuntimeError:  # no mpi4py: this process cannot stop the others; it can only say why
            comm = None
    return (comm or SingleProcess()).abort(message, code)


def global_loss(comm, loss_fn):
    """The loss of the whole global batch, and the ``scale`` this rank's ``loss_fn.backward`` needs.

    Call it right after ``loss_fn`` ran forward on this rank's images. A
    per-pixel mean over one process divides the summed pixel losses of the
    whole batch by the (weighted) count of its non-ignored pixels; a mean of
    the ranks' own means would differ as soon as ranks hold different numbers
    of ignored pixels. So the ranks add up their sums ``S_r`` and counts
    ``c_r`` (``loss_fn.loss_sum``, ``loss_fn.count``): with ``S`` and ``C`` the
    totals, the loss is :func:`whole_batch_loss` and the scale
    :func:`loss_scale`. One exchange (two numbers) between the ranks.

    Training needs no exchange of its own for this (:class:`StepLoss`): the
    counts depend on the labels alone, so each rank's count of its next batch
    and the step's ``S_r`` travel with the step's gradient average.
    """
    totals = comm.allreduce_sum(np.array([loss_fn.loss_sum, loss_fn.count], dtype=np.float64))
    loss_sum, count = float(totals[0]), float(totals[1])
    return (whole_batch_loss(loss_fn.reduction, loss_sum, count),
            loss_scale(loss_fn.reduction, comm.size, loss_fn.count, count))


class StepLoss:
    """:func:`global_loss`'s loss and scale for each step of one epoch, with no exchange of their own.

    ``count_of(labels)`` gives ``loss_fn.count`` of a batch from its labels alone
    (``loss_fn.count_of``), so the global count ``C`` of step t+1 is added up with
    step t's gradients, together with step t's loss sum; only the epoch's first
    step sums its count apart. Per step, after ``loss_fn``'s forward::

        dlogits = loss_fn.backward(step.scale(labels))
        sums = average_gradients(extra=step.values(next_labels))   # None after the last step
        loss = step.loss(sums)

    With one process nothing is counted ahead: ``C`` is ``loss_fn.count``.
    """

    def __init__(self, comm, loss_fn, count_of):
        self.comm, self.loss_fn, self.count_of = comm, loss_fn, count_of
        self._own = self._total = self._next = None  # this rank's and the global count of this step; the next's

    def scale(self, labels) -> float:
        """The scale of this rank's backward (:func:`loss_scale`), once ``loss_fn`` ran forward on ``labels``."""
        fn = self.loss_fn
        if self.comm.size == 1:
            self._total = fn.count
        elif self._total is None:  # the epoch's first step: its count is summed on its own
            self._own = self.count_of(labels)
            self._total = float(self.comm.allreduce_sum(np.array([self._own]))[0])
        if self.comm.size > 1 and fn.count != self._own:
            raise RuntimeError(f"the loss counted {fn.count} pixels where its count_of gave {self._own}")
        return loss_scale(fn.reduction, self.comm.size, fn.count, self._total)

    def values(self, next_labels) -> list:
        """What this step's gradient average carries: its loss sum, and this rank's count of the next batch
        (``next_labels``; None after the epoch's last step)."""
        counted = self.comm.size > 1 and next_labels is not None
        self._next = self.count_of(next_labels) if counted else None
        return [self.loss_fn.loss_sum, 0.0 if self._next is None else self._next]

    def loss(self, sums) -> float:
        """The step's loss (:func:`whole_batch_loss`) from the summed :meth:`values`; keeps the next count."""
        loss = whole_batch_loss(self.loss_fn.reduction, float(sums[0]), self._total)
        self._own, self._total = self._next, None if self._next is None else float(sums[1])
        return loss


def whole_batch_loss(reduction: str, loss_sum: float, count: float) -> float:
    """The global batch's loss from its summed pixel losses ``S`` and counted pixels ``C`` (all ranks)::

        loss = S / C    ('mean'; 0 when C is 0: nothing counted)    or    S    ('sum')
    """
    if reduction == "sum":
        return loss_sum
    return loss_sum / count if count > 0 else 0.0


def loss_scale(reduction: str, size: int, own_count: float, count: float) -> float:
    """The ``scale`` of rank r's ``loss_fn.backward``, from its own counted pixels ``c_r`` and the global ``C``::

        scale = N c_r / C    ('mean'; 0 when C is 0)    or    N    ('sum')

    Rank r's backward gives ``scale`` times the gradient of its own mean (or
    sum), i.e. ``N / C`` times the gradient of its summed pixel losses, and the
    average of that over the N ranks is ``1 / C`` times the gradient of all
    summed pixel losses: the one-process gradient. With one process, ``scale``
    is 1. A global batch with no counted pixel gets scale 0 (zero gradient),
    as the loss layer does for one batch.
    """
    if reduction == "sum":
        return float(size)
    return size * own_count / count if count > 0 else 0.0


# ---------------------------------------------------------------------------
# Gradient buckets
# ---------------------------------------------------------------------------


def trainable(params):
    """The trainable Parameters of ``params`` (Parameters or ``(name, Parameter)`` pairs), in order."""
    out = [item[1] if isinstance(item, tuple) else item for item in params]
    return [p for p in out if p.trainable]


def _address(a) -> int:
    """The address of an array's first element (NumPy or CuPy)."""
    return a.__array_interface__["data"][0] if hasattr(a, "__array_interface__") else a.data.ptr


def flat_buffers_of_gradients(params):
    """``[(flat, members)]``: the 1-D buffers in which some of the ``params``' gradients lie one after the
    other, as :class:`minifcn.optim.SGD` lays them out (:func:`minifcn.optim.aligned_offsets`: nothing
    else in the buffer but the gaps of less than ``ALIGN_BYTES`` before each), with those parameters in
    buffer order. ``flat`` is the part of the buffer from the first gradient to the end of the last."""
    by_base = {}
    for p in params:
        base = p.grad.base
        if base is not None and base.ndim == 1 and base.flags.c_contiguous and p.grad.flags.c_contiguous:
            by_base.setdefault(id(base), (base, []))[1].append(p)
    found = []
    for base, members in by_base.values():
        members.sort(key=lambda p: _address(p.grad))
        offsets = [(_address(p.grad) - _address(base)) // base.itemsize for p in members]
        ends = [o + p.size for o, p in zip(offsets, members)]
        gaps = [b - a for a, b in zip(ends[:-1], offsets[1:])]
        if all(0 <= gap * base.itemsize < ALIGN_BYTES for gap in gaps):
            found.append((base[offsets[0]:ends[-1]], members))
    return found


class GradientBuckets:
    """The gradients of trainable parameters laid out in flat buffers of at most ``bucket_bytes``.

    Gradients that already fill a flat buffer together (SGD's packed groups,
    :func:`flat_buffers_of_gradients`) stay there, and that buffer, cut into
    pieces of at most ``bucket_bytes``, is reduced as it is. The others are
    taken in order; a bucket holds consecutive parameters of one array module
    and dtype. After construction each ``p.grad`` is a view into its bucket
    (its values are kept), so backward's ``+=`` fills the buckets directly.
    :meth:`buffers` returns the flat buffers, first re-attaching any
    parameter whose ``.grad`` was replaced by a new array since.

    Attributes: ``buffers_`` (list of 1-D arrays), ``nbytes`` (total bytes).
    """

    def __init__(self, params, bucket_bytes: int = BUCKET_BYTES):
        if int(bucket_bytes) != bucket_bytes or bucket_bytes < 1:
            raise ValueError(f"GradientBuckets: bucket_bytes must be a positive int, got {bucket_bytes!r}")
        params = trainable(params)
        self.buffers_, self._views = [], []
        laid_out = set()
        for flat, members in flat_buffers_of_gradients(params):  # SGD's packed groups: reduced where they are
            per = max(1, int(bucket_bytes) // flat.itemsize)
            self.buffers_ += [flat[start:start + per] for start in range(0, flat.size, per)]
            self._views += [(p, p.grad) for p in members]
            laid_out.update(id(p) for p in members)
        groups, current, used = [], [], 0
        for p in (p for p in params if id(p) not in laid_out):
            nbytes = p.grad.nbytes
            same_kind = current and (get_array_module(p.grad) is get_array_module(current[0].grad)
                                     and p.grad.dtype == current[0].grad.dtype)
            if current and (not same_kind or used + nbytes > bucket_bytes):
                groups.append(current)
                current, used = [], 0
            current.append(p)
            used += nbytes
        if current:
            groups.append(current)
        for group in groups:
            xp, dtype = get_array_module(group[0].grad), group[0].grad.dtype
            flat = xp.empty(sum(p.size for p in group), dtype=dtype)
            offset = 0
            for p in group:
                view = flat[offset:offset + p.size].reshape(p.shape)
                view[...] = p.grad
                p.grad = view
                self._views.append((p, view))
                offset += p.size
            self.buffers_.append(flat)
        self.nbytes = sum(int(b.nbytes) for b in self.buffers_)

    def buffers(self):
        """The flat gradient buffers, with every parameter's current ``.grad`` in them."""
        for p, view in self._views:
            if p.grad is not view:  # replaced (e.g. by Module.to): copy it in and attach the view again
                view[...] = p.grad
                p.grad = view
        return self.buffers_


class _NoAverage:
    """The single-process gradient averager: there is nothing to average with."""

    nbytes = 0

    def __call__(self, extra=None):
        return None if extra is None else np.array(extra, dtype=np.float64)


class _GradientAverager:
    """Averages the trainable gradients over the ranks of ``comm`` in place, by ``route``."""

    def __init__(self, comm, params, route: str, bucket_bytes: int):
        if route not in GRADIENT_ROUTES:
            raise ValueError(f"gradient route must be one of {', '.join(GRADIENT_ROUTES)}, got {route!r}")
        self.comm, self.route = comm, route
        if route == "buckets":
            self.buckets = GradientBuckets(params, bucket_bytes)
            self.nbytes = self.buckets.nbytes
        else:
            self.params = trainable(params)
            self.nbytes = sum(int(p.grad.nbytes) for p in self.params)

    def arrays(self):
        """The arrays one step reduces: the buckets, or every trainable gradient."""
        return self.buckets.buffers() if self.route == "buckets" else [p.grad for p in self.params]

    def __call__(self, extra=None):
        """Average the gradients in place; with ``extra``, return its sum over the ranks (float64)."""
        arrays = self.arrays()
        if extra is not None and not arrays:
            return self.comm.allreduce_sum(np.asarray(extra, dtype=np.float64))
        for array in arrays[:-1] if extra is not None else arrays:
            self.comm.allreduce_mean_(array)
        if extra is not None:
            return self.comm.allreduce_mean_and_sum_(arrays[-1], extra)
        return None


# ---------------------------------------------------------------------------
# Packing arrays for broadcasts
# ---------------------------------------------------------------------------


def _pack(arrays):
    """Host arrays concatenated per dtype: ``{dtype: flat}`` (NumPy), in order."""
    by_dtype = {}
    for a in arrays:
        by_dtype.setdefault(np.dtype(a.dtype), []).append(to_numpy(a).ravel())
    return {dtype: np.concatenate(parts) for dtype, parts in by_dtype.items()}


def _unpack(flat_by_dtype, arrays) -> None:
    """Copy the packed values back into ``arrays`` (NumPy or CuPy), in the order :func:`_pack` took them."""
    offsets = dict.fromkeys(flat_by_dtype, 0)
    for a in arrays:
        dtype = np.dtype(a.dtype)
        start = offsets[dtype]
        part = flat_by_dtype[dtype][start:start + a.size].reshape(a.shape)
        a[...] = get_array_module(a).asarray(part)
        offsets[dtype] = start + a.size


# ---------------------------------------------------------------------------
# Communicators
# ---------------------------------------------------------------------------


class SingleProcess:
    """The communicator of a process that trains alone: rank 0 of 1, every operation the identity."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    name = "single process"

    def broadcast_arrays(self, arrays) -> None:
        """Rank 0's values into ``arrays`` on every rank (in place)."""

    def broadcast_object(self, value):
        """Rank 0's ``value`` (any picklable object), returned on every rank."""
        return value

    def allreduce_sum_(self, array):
        """``array`` replaced in place by its sum over the ranks; returns it."""
        return array

    def allreduce_sum(self, array):
        """The sum over the ranks of a host array (a copy; ``array`` is left as it is)."""
        return np.array(array, copy=True)

    def allreduce_mean_(self, array):
        """``array`` replaced in place by its mean over the ranks, ``sum * (1 / size)`` (the factor in
        ``array``'s dtype); returns it."""
        self.allreduce_sum_(array)
        array *= array.dtype.type(1.0 / self.size)
        return array

    def allreduce_mean_and_sum_(self, array, extra):
        """:meth:`allreduce_mean_` of ``array``, and the sum over the ranks of the small float64 host vector
        ``extra`` (returned; ``extra`` is left as it is), in one exchange where the communicator can
        (:class:`minifcn.local_ranks.SharedMemoryCommunicator`); here, one after the other."""
        self.allreduce_mean_(array)
        return self.allreduce_sum(np.asarray(extra, dtype=np.float64))

    def gradient_averager(self, params, route: str = "buckets", bucket_bytes: int = BUCKET_BYTES):
        """A callable that averages the gradients of the trainable ``params`` over the ranks. Called as
        ``average(extra=values)`` it also returns the sum over the ranks of ``values`` (float64), which
        travel with the last gradient array (:meth:`allreduce_mean_and_sum_`)."""
        return _NoAverage()

    def gather_objects(self, value):
        """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the others."""
        return [value]

    def check_same(self, description: dict, what: str = "launch") -> None:
        """Raise :class:`LaunchMismatch` on every rank unless all ranks have the same ``description``."""
        descriptions = self.gather_objects(description)
        message = self.broadcast_object(mismatch_message(descriptions, what) if self.rank == 0 else None)
        if message:
            raise LaunchMismatch(message)

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def bind_device(self, device: str) -> None:
        """Make this rank use its own GPU (by node-local rank) when ``device`` is 'gpu'."""

    def abort(self, message: str, code: int, detail: str = "") -> int:
        """Report a failure: print ``detail`` and ``message`` to stderr and return ``code`` (to exit with)."""
        print(f"{detail}{message}", file=sys.stderr)
        return code


class MPICommunicator(SingleProcess):
    """``MPI.COMM_WORLD`` (mpi4py) with the operations of :class:`SingleProcess`.

    Making one also: installs an ``excepthook`` that aborts the whole job on
    an uncaught exception, and, when ``MINIFCN_NUM_THREADS`` is not set, gives
    each of the ranks sharing a machine its share of the cores for the band
    threads (:mod:`minifcn.parallel`), so N ranks on one machine do not run
    N times as many threads as cores.
    """

    def __init__(self, comm):
        from mpi4py import MPI  # noqa: PLC0415 (optional dependency)

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.name = "MPI (" + " ".join(MPI.Get_library_version().split()[:3]) + ")"
        self._nccl = None
        if "MINIFCN_NUM_THREADS" not in os.environ:
            try:
                cores = len(os.sched_getaffinity(0))
            except AttributeError:
                cores = os.cpu_count() or 1
            os.environ["MINIFCN_NUM_THREADS"] = str(max(1, cores // self.local_size))
        sys.excepthook = self._abort_on_uncaught

    # -- failures -------------------------------------------------------------
    def _abort_on_uncaught(self, kind, exc, tb):
        trace = "".join(traceback.format_exception(kind, exc, tb))
        self.abort(f"uncaught {kind.__name__}; stopping every rank", 1, detail=trace)

    def abort(self, message: str, code: int, detail: str = "") -> int:
        """Print ``detail`` (a traceback) and ``message`` naming this rank, then end every rank of the job
        with exit code ``code``."""
        sys.stdout.flush()
        sys.stderr.write(f"{detail}rank {self.rank} of {self.size}: {message}\n")  # one write: not interleaved
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # the launcher stops forwarding output once it learns of the abort
        self.comm.Abort(int(code) or 1)
        return code  # not reached

    # -- collectives ------------------------------------------------------------
    def broadcast_arrays(self, arrays) -> None:
        arrays = list(arrays)
        packed = _pack(arrays)
        for dtype in sorted(packed, key=str):  # the same order on every rank
            self.comm.Bcast(packed[dtype], root=0)
        _unpack(packed, arrays)

    def broadcast_object(self, value):
        return self.comm.bcast(value, root=0)

    def allreduce_sum_(self, array):
        xp = get_array_module(array)
        if xp is np:
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        elif gpu_route() == "nccl":
            self._nccl_allreduce_sum_(array)
        else:  # CUDA-aware MPI reads the device buffer: the kernels writing it must have finished
            xp.cuda.get_current_stream().synchronize()
            self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)
        return array

    def allreduce_sum(self, array):
        out = np.array(array, copy=True)
        self.comm.Allreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)
        return out

    def allreduce_mean_and_sum_(self, array, extra):
        # The small sum is started first and completes while the ranks meet in the gradient average.
        out = np.array(extra, dtype=np.float64, copy=True)
        request = self.comm.Iallreduce(self.MPI.IN_PLACE, out, op=self.MPI.SUM)
        try:
            self.allreduce_mean_(array)
        finally:
            request.Wait()
        return out

    def gradient_averager(self, params, route: str = "buckets", bucket_bytes: int = BUCKET_BYTES):
        return _GradientAverager(self, params, route, bucket_bytes)

    def gather_objects(self, value):
        return self.comm.gather(value, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    def bind_device(self, device: str) -> None:
        if device != "gpu":
            return
        import cupy  # noqa: PLC0415 (only for device 'gpu')

        cupy.cuda.Device(self.local_rank % cupy.cuda.runtime.getDeviceCount()).use()

    # -- NCCL (CuPy) --------------------------------------------------------------
    def _nccl_allreduce_sum_(self, array):
        import cupy  # noqa: PLC0415
        from cupy.cuda import nccl  # noqa: PLC0415

        if self._nccl is None:  # one NCCL communicator, its id made by rank 0 and sent to all over MPI
            uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
            self._nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        kinds = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64,
                 np.dtype(np.int64): nccl.NCCL_INT64}
        if np.dtype(array.dtype) not in kinds or not array.flags.c_contiguous:
            raise ValueError(f"NCCL allreduce: need a contiguous float32, float64 or int64 array, got {array.dtype}")
        stream = cupy.cuda.get_current_stream()  # NCCL runs in stream order after the kernels that wrote it
        self._nccl.allReduce(array.data.ptr, array.data.ptr, array.size, kinds[np.dtype(array.dtype)],
                             nccl.NCCL_SUM, stream.ptr)


def gpu_route() -> str:
    """How CuPy buffers are reduced: ``"nccl"`` when CuPy has NCCL, else ``"mpi"`` (CUDA-aware MPI).
    ``MINIFCN_GPU_ALLREDUCE=nccl|mpi`` chooses explicitly."""
    chosen = os.environ.get("MINIFCN_GPU_ALLREDUCE", "").strip().lower()
    if chosen:
        if chosen not in ("nccl", "mpi"):
            raise ValueError(f"MINIFCN_GPU_ALLREDUCE must be 'nccl' or 'mpi', got {chosen!r}")
        return chosen
    try:
        from cupy.cuda import nccl  # noqa: PLC0415

        return "nccl" if getattr(nccl, "available", True) else "mpi"
    except ImportError:
        return "mpi"


# ---------------------------------------------------------------------------
# Start-up check
# ---------------------------------------------------------------------------


def _flatten(description: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in description.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def mismatch_message(descriptions: list, what: str = "launch") -> str | None:
    """None when every rank's description equals rank 0's; else a message naming each difference.

    Inputs: one dict per rank (nested dicts compared key by key)."""
    reference = _flatten(descriptions[0])
    lines = []
    for rank, description in enumerate(descriptions[1:], start=1):
        other = _flatten(description)
        for key in sorted(set(reference) | set(other)):
            mine, theirs = reference.get(key, "<missing>"), other.get(key, "<missing>")
            if mine != theirs:
                shown = [repr(v) if len(repr(v)) <= 120 else repr(v)[:117] + "..." for v in (theirs, mine)]
                lines.append(f"rank {rank} has {key} = {shown[0]} where rank 0 has {shown[1]}")
    if not lines:
        return None
    more = f"\n  ... and {len(lines) - 10} more" if len(lines) > 10 else ""
    return (f"the {len(descriptions)} ranks of this job disagree ({what}); start every rank with the same "
            f"command, code and data:\n  " + "\n  ".join(lines[:10]) + more)
