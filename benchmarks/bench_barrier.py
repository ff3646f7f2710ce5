"""The barrier of local ranks (``minifcn.local_ranks.RankBarrier``) against ``multiprocessing.Barrier``.

``size`` processes (spawned, each pinned to its own core where there are enough) wait in a barrier
``--waits`` times in a row; the table gives microseconds a wait, the median over the ranks and
``--rounds`` rounds. A training step of ``minifcn train`` on local ranks waits a few times (the loss
sum, the gradient average), so a wait's own cost counts once per wait, every step.

    python benchmarks/bench_barrier.py
    python benchmarks/bench_barrier.py --size 3 --waits 5000
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine_line, print_table  # noqa: E402
from minifcn import local_ranks  # noqa: E402


def _waits(barrier, rank, waits, cores, report):
    if cores is not None:
        os.sched_setaffinity(0, cores)
    wait = (lambda: barrier.wait(rank)) if isinstance(barrier, local_ranks.RankBarrier) else barrier.wait
    for _ in range(max(10, waits // 10)):  # warm-up
        wait()
    start = time.perf_counter()
    for _ in range(waits):
        wait()
    report.put((time.perf_counter() - start) / waits * 1e6)


def time_barrier(kind: str, size: int, waits: int, spin_tries: int | None = None) -> float:
    """Median microseconds a wait over ``size`` ranks of barrier ``kind`` ('multiprocessing' or 'rank')."""
    context = multiprocessing.get_context("spawn")
    if kind == "multiprocessing":
        barrier = context.Barrier(size)
    else:
        barrier = local_ranks.RankBarrier(size, context, local_ranks.SPIN_TRIES if spin_tries is None else spin_tries)
    report = context.Queue()
    processes = [context.Process(target=_waits, args=(barrier, r, waits, local_ranks.cores_of_rank(r, size), report))
                 for r in range(size)]
    for process in processes:
        process.start()
    times = [report.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2, help="processes (ranks)")
    parser.add_argument("--waits", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(machine_line())
    cases = [("multiprocessing.Barrier", "multiprocessing", None),
             (f"RankBarrier (spin {local_ranks.SPIN_TRIES} tries: the default, a core a rank)", "rank", None),
             ("RankBarrier, no spin (sleeps at once)", "rank", 0)]
    times = {name: [] for name, _, _ in cases}
    for _ in range(args.rounds):  # interleaved, round by round
        for name, kind, spin in cases:
            times[name].append(time_barrier(kind, args.size, args.waits, spin))
    print(f"\n{args.size} processes, {args.waits} waits in a row, medians over ranks and {args.rounds} rounds")
    print_table(["barrier", "us a wait"], [[name, f"{statistics.median(t):.1f}"] for name, t in times.items()])


if __name__ == "__main__":
    main()
