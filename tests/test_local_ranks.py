"""Ranks as processes of this machine (minifcn.local_ranks): the collectives, failures, and training on them.

The targets below run in spawned processes, which import this module by name to find them.
"""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minifcn import Parameter, local_ranks
from minifcn.checkpoint import load_checkpoint
from minifcn.distributed import LaunchMismatch, SingleProcess
from minifcn.train import LOCAL_RANKS, TrainConfig, gather_predictions, resolve_ranks, train


def _collectives(comm):
    r, n = comm.rank, comm.size
    report = {}
    # broadcasts: rank 0's values everywhere, any dtype, also past one slot (chunks)
    big = np.full(local_ranks.SLOT_BYTES // 8 * 2 + 5, float(r))
    arrays = [np.full((2, 3), 10.0 + r), np.full(4, r, np.int64), np.full(5, 0.5 + r, np.float32), big]
    comm.broadcast_arrays(arrays)
    report["broadcast"] = all((a == b).all() for a, b in zip(
        arrays, [np.full((2, 3), 10.0), np.zeros(4), np.full(5, 0.5), np.zeros(big.size)]))
    report["object"] = comm.broadcast_object({"rank": r})
    # sums: in place, in rank order, the same bits everywhere; sizes below the rank count and past a slot
    rng = np.random.default_rng(r)
    for size in (1, n - 1 or 1, 7, local_ranks.SLOT_BYTES // 4 * 2 + 3):
        mine = rng.standard_normal(size).astype(np.float32)
        total = comm.allreduce_sum_(mine.copy())
        expected = np.zeros(size, np.float32)
        for other in range(n):
            expected += np.random.default_rng(other).standard_normal(size).astype(np.float32) if other != r \
                else mine
        report[f"sum {size}"] = bool(np.array_equal(total, expected))
        mean = comm.allreduce_mean_(mine.copy())  # the sum's bits times the dtype's 1 / n
        report[f"mean {size}"] = bool(np.array_equal(mean, expected * np.float32(1.0 / n)))
        rng = np.random.default_rng(r)  # the next size draws from the start again, as 'expected' does
    # a mean with float64 values summed in the same exchange (the step's loss): empty, small, past a slot
    for size in (0, 7, local_ranks.SLOT_BYTES // 4 + 3):
        mine = rng.standard_normal(size).astype(np.float32)
        values = np.array([0.1 * (r + 1), 1e-17 * r, 3.0 + r])
        totals = comm.allreduce_mean_and_sum_(array := mine.copy(), values)
        expected = sum((np.random.default_rng(o).standard_normal(size).astype(np.float32) if o != r else mine
                        for o in range(1, n)), start=(np.random.default_rng(0).standard_normal(size)
                                                      .astype(np.float32) if r else mine).copy())
        exact = sum((np.array([0.1 * (o + 1), 1e-17 * o, 3.0 + o]) for o in range(1, n)), start=np.array([0.1, 0, 3.0]))
        report[f"mean+sum {size}"] = bool(np.array_equal(array, expected * np.float32(1.0 / n))
                                          and np.array_equal(totals, exact) and values[2] == 3.0 + r)
        rng = np.random.default_rng(r)
    try:  # more values than a slot's tail holds: refused by name, before any rank waits
        comm.allreduce_mean_and_sum_(np.zeros(3, np.float32), np.zeros(local_ranks.EXTRA_BYTES // 8 + 1))
        report["too many extra"] = None
    except ValueError as exc:
        report["too many extra"] = str(exc)
    matrix = np.arange(9, dtype=np.int64).reshape(3, 3) * (r + 1)
    report["in place"] = comm.allreduce_sum_(matrix) is matrix
    report["matrix"] = matrix.tolist()
    totals = np.array([1.5, 2.0 + r])
    report["copy"] = (comm.allreduce_sum(totals).tolist(), totals.tolist())
    # the gradient average (buckets), a frozen gradient untouched
    params = [Parameter(np.zeros(s), trainable=(i != 1)) for i, s in enumerate([(4, 3), (2,), (5,)])]
    for i, p in enumerate(params):
        p.grad[...] = (r + 1) * np.arange(p.size).reshape(p.shape) + i
    comm.gradient_averager(params)()
    report["grads"] = [p.grad.tolist() for p in params]
    report["extra"] = comm.gradient_averager(params)(extra=[r + 0.5, 2.0]).tolist()  # the grads averaged again
    # the preview's predictions, each held by the rank that scored it, of three shapes: everywhere, in order
    kept = {i: np.full((2 + i, 3), 10 * i + 1, np.int64) for i in range(3) if i % n == r}
    report["gathered"] = [g.tolist() for g in gather_predictions(comm, kept, 3)]
    comm.check_same({"width": 0.125})
    try:
        comm.check_same({"width": 0.125 * (r + 1)})
        report["mismatch"] = None
    except LaunchMismatch as exc:
        report["mismatch"] = str(exc)
    comm.log(f"rank {r} says hello")
    # every rank's own checks, counted over the ranks (rank 0 alone reports)
    checks = [k for k in report if k in ("broadcast", "in place") or k.startswith("sum ")]
    mine = np.array([bool(report[k]) for k in checks] + [report["object"] == {"rank": 0}], np.int64)
    report["ranks passing"] = dict(zip(checks + ["object"], comm.allreduce_sum(mine).tolist()))
    comm.barrier()
    return report if r == 0 else None


@pytest.mark.parametrize("size", [2, 3])
def test_collectives_on_local_ranks(size):
    """Broadcasts, exact sums (in rank order, chunked past a slot), the gradient average, the start-up
    check and rank 0's log lines, on 2 and 3 processes."""
    lines = []
    report = local_ranks.run(size, _collectives, log=lines.append)
    assert report["broadcast"] and report["object"] == {"rank": 0}
    assert all(report[k] for k in report if k.startswith(("sum ", "mean ", "mean+sum "))), report
    assert sum(k.startswith("mean ") for k in report) >= 3  # sizes 1, 7 and past a slot (and n - 1)
    assert sum(k.startswith("mean+sum ") for k in report) == 3
    assert report["extra"] == [size * size / 2, 2.0 * size]
    assert "at most 512 extra values, got 513" in report["too many extra"]
    assert report["in place"]
    scale = size * (size + 1) // 2
    assert report["matrix"] == (scale * np.arange(9).reshape(3, 3)).tolist()
    assert report["copy"] == ([1.5 * size, 2.0 * size + scale - size], [1.5, 2.0])
    mean = (size + 1) / 2
    assert report["grads"][0] == (mean * np.arange(12).reshape(4, 3)).tolist()
    assert report["grads"][1] == [1.0, 2.0]  # frozen: rank 0's own
    assert report["grads"][2] == (mean * np.arange(5) + 2).tolist()
    assert report["gathered"] == [np.full((2 + i, 3), 10 * i + 1).tolist() for i in range(3)]
    assert "rank 1 has width = 0.25 where rank 0 has 0.125" in report["mismatch"]
    assert lines == ["rank 0 says hello"]
    assert report["ranks passing"] == dict.fromkeys(report["ranks passing"], size), report["ranks passing"]


def _back_to_back(comm, calls):
    """``calls`` sums and broadcasts with no other synchronisation between them, each result checked here:
    a rank that reuses a slot before another has read it gets (or gives) a wrong value."""
    r, n = comm.rank, comm.size
    wrong = 0
    for k in range(calls):
        if k % 5 == 4:
            value = np.full(3, float(k + 10 * r))
            comm.broadcast_arrays([value])
            wrong += int(not (value == k).all())
        else:
            total = comm.allreduce_sum_(np.full(1000 + k % 3, float(k * (r + 1))))
            wrong += int(not (total == k * n * (n + 1) / 2).all())
    return int(comm.allreduce_sum(np.array([wrong]))[0])


@pytest.mark.parametrize("size", [2, 3])
def test_back_to_back_collectives_never_overwrite_a_slot_in_use(size):
    """Sums and broadcasts take the two sets of slots in turn with two barriers a chunk: a fast rank may
    start the next one while the others still copy out of this one, but never writes where they read."""
    assert local_ranks.run(size, _back_to_back, 400) == 0



def _barrier_rounds(barrier, rank, arrived, rounds, report):
    """Each round: say so in arrived[rank], wait, and check that every rank has reached this round."""
    behind = 0
    for g in range(1, rounds + 1):
        arrived[rank] = g
        barrier.wait(rank)
        behind += sum(1 for k in range(len(arrived)) if arrived[k] < g)
        if rank == g % len(arrived):  # one rank a round is late, by turns: the others sleep on their tokens
            time.sleep(0.002 if g % 50 == 0 else 0)
    report.put((rank, behind))


@pytest.mark.parametrize("size,spin", [(2, local_ranks.SPIN_TRIES), (3, local_ranks.SPIN_TRIES), (3, 0)])
def test_rank_barrier_lets_no_rank_pass_before_all_have_arrived(size, spin):
    """RankBarrier over hundreds of rounds, ranks late by turns (some by milliseconds, past the spin), with
    and without the spin: no rank ever passes round g while another has not reached it."""
    import multiprocessing  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    barrier = local_ranks.RankBarrier(size, context, spin)
    arrived, report = context.RawArray("i", size), context.Queue()
    processes = [context.Process(target=_barrier_rounds, args=(barrier, r, arrived, 400, report))
                 for r in range(size)]
    for process in processes:
        process.start()
    results = dict(report.get(timeout=60) for _ in processes)
    for process in processes:
        process.join(10)
    assert results == {r: 0 for r in range(size)}


def _spin_tries(comm):
    return comm._barrier.spin_tries


def test_ranks_spin_in_the_barrier_only_with_a_core_each():
    """run() gives the barrier its spin where every rank has a core of its own, and none with more ranks than
    cores (a spinning rank would hold a core another rank needs)."""
    cores = local_ranks.threads_per_rank(1)
    assert local_ranks.run(min(2, cores), _spin_tries) == local_ranks.SPIN_TRIES
    assert local_ranks.run(cores + 1, _spin_tries) == 0


def _wait_alone(barrier, report):
    try:
        barrier.wait(0)
        report.put("passed")
    except threading.BrokenBarrierError:
        report.put("broken")


def test_an_aborted_rank_barrier_wakes_its_waiters_and_refuses_later_ones():
    """abort() from another process: a rank asleep in wait() raises BrokenBarrierError within the poll
    interval, and a later wait raises at once."""
    import multiprocessing  # noqa: PLC0415

    context = multiprocessing.get_context("spawn")
    barrier, report = local_ranks.RankBarrier(2, context), context.Queue()
    waiter = context.Process(target=_wait_alone, args=(barrier, report))
    waiter.start()
    time.sleep(1.0)  # rank 1 never comes: rank 0 is asleep on its token
    assert report.empty()
    started = time.monotonic()
    barrier.abort()
    assert report.get(timeout=10) == "broken"
    assert time.monotonic() - started < 10 * local_ranks.ABORT_POLL_S + 1
    waiter.join(10)
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(1)


def _cores(comm):
    """How many ranks run on each core (summed over the ranks), and this rank's core count."""
    mine = os.sched_getaffinity(0)
    on = np.zeros(os.cpu_count() or 1, np.int64)
    on[sorted(mine)] = 1
    return comm.allreduce_sum(on).tolist(), len(mine)


def test_cores_of_rank_shares_the_cores_out():
    assert local_ranks.cores_of_rank(0, 2, {0, 1, 2, 3}) == {0, 1}
    assert local_ranks.cores_of_rank(1, 2, {5, 3, 4, 6}) == {5, 6}
    assert local_ranks.cores_of_rank(2, 3, {0, 1, 2, 3}) == {2}   # the last core is left to the rest
    assert local_ranks.cores_of_rank(0, 3, {0, 1}) is None         # more ranks than cores: not pinned


@pytest.mark.parametrize("bad", ["no", "false", "2", "yes"])
def test_a_bad_pin_setting_is_refused_by_name(monkeypatch, bad):
    monkeypatch.setenv(local_ranks.PIN_VARIABLE, bad)
    with pytest.raises(ValueError, match=f"MINIFCN_PIN_RANKS must be 0 .* got '{bad}'"):
        local_ranks.cores_of_rank(0, 2, {0, 1})
    with pytest.raises(ValueError, match="MINIFCN_PIN_RANKS"):  # before any process starts
        local_ranks.run(2, _cores)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinities and two cores")
@pytest.mark.parametrize("pin", ["", "0"])
def test_ranks_run_on_their_own_cores_unless_told_not_to(monkeypatch, pin):
    """Pinned, the two ranks share no core and each has half of the parent's; MINIFCN_PIN_RANKS=0 leaves
    both on all of them."""
    monkeypatch.setenv(local_ranks.PIN_VARIABLE, pin)
    parent = os.sched_getaffinity(0)
    per_core, own = local_ranks.run(2, _cores)
    if pin == "0":
        assert own == len(parent) and max(per_core) == 2
    else:
        assert own == len(parent) // 2 and max(per_core) == 1 and sum(per_core) == 2 * own


def _fails(comm, how):
    comm.barrier()
    if comm.rank == 1:
        if how == "exit":
            os._exit(7)
        raise ValueError("image 3 is corrupt on rank 1")
    comm.allreduce_sum_(np.zeros(3))  # rank 0 waits here for a rank that will not come
    return "no"


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_failing_rank_stops_the_others_and_its_error_is_raised_here(how):
    """Rank 1 fails while rank 0 waits in a sum: run() returns within seconds with rank 1's exception (or,
    for a process that just ended, RankFailed with its exit code), and no process is left."""
    expected = (ValueError, "image 3 is corrupt on rank 1") if how == "raise" else \
        (local_ranks.RankFailed, "rank 1 of 2 ended with exit code 7")
    done = threading.Event()
    timer = threading.Timer(60, lambda: done.is_set() or os._exit(99))  # a hang fails the suite, loudly
    timer.start()
    try:
        with pytest.raises(expected[0], match=expected[1]):
            local_ranks.run(2, _fails, how)
    finally:
        done.set()
        timer.cancel()
    assert not [p for p in __import__("multiprocessing").active_children() if p.name.startswith("minifcn-rank")]


def _threads(comm):
    return {name: os.environ.get(name) for name in local_ranks.THREAD_VARIABLES}


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    for name in local_ranks.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen = local_ranks.run(2, _threads)
    share = str(local_ranks.threads_per_rank(2))
    assert seen == dict.fromkeys(local_ranks.THREAD_VARIABLES, share)
    assert all(name not in os.environ for name in local_ranks.THREAD_VARIABLES)  # this process's are restored
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")  # the user's choice is kept
    assert local_ranks.run(2, _threads)["MINIFCN_NUM_THREADS"] == "3"


def test_run_refuses_a_rank_count_that_is_not_a_positive_integer():
    with pytest.raises(ValueError, match="ranks must be a positive integer, got 0"):
        local_ranks.run(0, _threads)


class _Launched(SingleProcess):
    size = 2


def test_ranks_default_to_two_and_to_one_under_mpiexec():
    assert LOCAL_RANKS == 2
    assert resolve_ranks(TrainConfig(), SingleProcess()) == LOCAL_RANKS
    assert resolve_ranks(TrainConfig(), _Launched()) == 1
    assert resolve_ranks(TrainConfig(ranks=3), SingleProcess()) == 3
    with pytest.raises(ValueError, match=r"ranks \(--ranks\) 2: this process is one of 2 ranks an MPI launcher"):
        resolve_ranks(TrainConfig(ranks=2), _Launched())


def _tiny(out, **kw):
    cfg = dict(model="fcn8s", width=1 / 32, image_size=16, train_images=4, val_images=3, epochs=1, lr=0.05,
               warmup=0, dropout=0.0, dtype="float64", seed=3, out=str(out), progress=False, num_preview=1)
    return TrainConfig(**{**cfg, **kw})


@pytest.mark.parametrize("weights", ["none", "balanced"])
def test_two_local_ranks_of_batch_1_take_the_steps_of_one_process_of_batch_2(weights, tmp_path):
    """float64, 2 SGD steps with momentum and weight decay: the same parameters and momentum to 1e-10, the
    same loss and the same scores (the held-out images sharded 2 + 1 between the ranks); rank 0 logs once.
    With class weights the ranks' (weighted) pixel counts differ from image to image, so each step needs
    the global batch's count (it comes with the previous step's gradients) for its loss and gradient."""
    one = train(_tiny(tmp_path / "one", ranks=1, batch_size=2, class_weight=weights), log=lambda *a: None)
    lines = []
    two = train(_tiny(tmp_path / "two", ranks=2, batch_size=1, class_weight=weights), log=lines.append)
    assert sum("epoch 1/1:" in line for line in lines) == 1
    assert any("2 ranks x batch 1 (2 processes of this machine)" in line for line in lines)
    a, meta_a = load_checkpoint(tmp_path / "one" / "checkpoint.npz")
    b, meta_b = load_checkpoint(tmp_path / "two" / "checkpoint.npz")
    assert sorted(a) == sorted(b) and meta_b["config"]["ranks"] == 2 and meta_a["config"]["ranks"] == 1
    changed = 0
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-300)
        assert float(np.abs(a[name] - b[name]).max()) / scale <= 1e-10, name
        changed += name.startswith("optim.momentum.") and bool(np.abs(a[name]).max() > 0)
    assert changed > 5  # the momentum buffers moved: the steps were taken
    assert one[0]["train_loss"] == pytest.approx(two[0]["train_loss"], rel=1e-10)
    for key in ("pixel_acc", "mean_iu", "fwiu"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-12), key
    for picture in ("loss.png", "predictions.png"):
        assert (tmp_path / "two" / picture).is_file()


def test_an_error_in_a_rank_reaches_the_caller_of_train(tmp_path):
    """A bad setting found inside the ranks (a folder dataset that does not exist) is raised by train()."""
    with pytest.raises(Exception, match="nodata"):
        train(_tiny(tmp_path / "out", ranks=2, dataset="folder", data_dir=str(tmp_path / "nodata")),
              log=lambda *a: None)


def _wait_forever(comm, folder):
    (folder / f"rank{comm.rank}.pid").write_text(str(os.getpid()))
    comm.barrier()
    while True:
        time.sleep(0.05)


KILLED_PARENT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from minifcn import local_ranks
from test_local_ranks import _wait_forever
local_ranks.run(2, _wait_forever, Path(sys.argv[2]))
"""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (ended, not yet reaped) counts as ended
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc to tell a zombie from a live process")
def test_the_ranks_end_when_their_parent_is_killed_outright(tmp_path):
    """SIGKILL of the process that started the ranks (no cleanup of its own can run) ends both ranks within
    seconds: they do not wait in a barrier forever, nor write a run folder unwatched."""
    parent = subprocess.Popen([sys.executable, "-c", KILLED_PARENT, os.path.dirname(__file__), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("rank*.pid"))) < 2:
            assert time.monotonic() < deadline and parent.poll() is None, "the ranks did not start"
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in sorted(tmp_path.glob("rank*.pid"))]
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in pids)
    finally:
        parent.kill()


def test_resume_on_local_ranks_continues_as_the_run_straight_through(tmp_path):
    """Two local ranks train one epoch, then resume for a second (rank 0 reads the checkpoint and sends
    parameters, momentum and history to rank 1): the same parameters, bit for bit, as two epochs straight."""
    kw = dict(ranks=2, schedule="constant")  # (a poly schedule's length depends on the epochs asked for)
    straight = train(_tiny(tmp_path / "straight", epochs=2, **kw), log=lambda *a: None)
    train(_tiny(tmp_path / "resumed", epochs=1, **kw), log=lambda *a: None)
    lines = []
    resumed = train(_tiny(tmp_path / "resumed", epochs=2, resume=True, **kw), log=lines.append)
    assert any(line.startswith("resuming from") for line in lines)
    a, _ = load_checkpoint(tmp_path / "straight" / "checkpoint.npz")
    b, meta = load_checkpoint(tmp_path / "resumed" / "checkpoint.npz")
    assert meta["epoch"] == 1 and [r["epoch"] for r in resumed] == [1, 2]
    assert all(np.array_equal(a[name], b[name]) for name in a)
    assert [r["train_loss"] for r in straight] == [r["train_loss"] for r in resumed]


@pytest.mark.parametrize("ranks", [0, -2, 1.5, True])
def test_a_rank_count_that_is_not_a_positive_integer_is_refused_by_name(ranks, tmp_path):
    with pytest.raises(ValueError, match=rf"ranks \(--ranks\) must be a positive integer .*got {ranks!r}"):
        train(_tiny(tmp_path / "out", ranks=ranks), log=lambda *a: None)
