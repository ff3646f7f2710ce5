"""A short ``minifcn train`` run alone and beside one busy process, with idle BLAS threads sleeping or spinning.

Each run is a fresh process (OpenBLAS reads ``OPENBLAS_THREAD_TIMEOUT`` once, when NumPy loads), timed from
start to exit. Two settings, alternating round by round:

* ``sleep``: minifcn's default (the package sets ``OPENBLAS_THREAD_TIMEOUT=4`` before NumPy loads);
* ``spin``: ``OPENBLAS_THREAD_TIMEOUT=28``, OpenBLAS's own default (idle threads spin for 2^28 cycles).

and two conditions: alone, and beside ``python -c "while 1: pass"`` (started before the run, killed after).

    python benchmarks/bench_under_load.py                       # 300 steps, 2 rounds
    python benchmarks/bench_under_load.py --steps 200 --rounds 3
    python benchmarks/bench_under_load.py --also 16,20          # and OPENBLAS_THREAD_TIMEOUT=16 and =20
    python benchmarks/bench_under_load.py --before 3b97afb --rounds 3   # that commit against the working tree

With ``--before REV`` the two rows are the package at ``REV`` (``git archive``) and the working tree, both
with the default idle threads, alternating run by run: on a VM whose speed moves within minutes, only
such paired runs compare two versions.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from common import machine_line, print_table  # noqa: E402

SETTINGS = {"sleep": None, "spin": "28"}  # OPENBLAS_THREAD_TIMEOUT (None: the package's default)
CONDITIONS = ("alone", "beside a busy process")


def timed_run(steps: int, image_size: int, timeout_value, out: str, ranks=None, root: str = ROOT) -> float:
    """Wall seconds of ``minifcn train`` (the package in ``root``) on ``steps`` training images (batch 1 a
    rank; the command's default ranks unless ``ranks``) and a small held-out split."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    if timeout_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = timeout_value
    cmd = [sys.executable, "-m", "minifcn", "train", "--out", out, "--epochs", "1", "--train-images", str(steps),
           "--val-images", "16", "--batch-size", "1", "--image-size", str(image_size), "--no-progress"]
    cmd += ["--ranks", str(ranks)] if ranks else []
    start = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=root, check=True, capture_output=True)  # (cwd: python -m looks there first)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300,
                   help="training images of the one epoch (batch 1 a rank: steps with --ranks 1)")
    p.add_argument("--ranks", type=int, default=None, help="--ranks of the runs (default: the command's)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--image-size", type=int, default=128, help="image side (the training default: 128)")
    p.add_argument("--also", default="", help="comma list of other OPENBLAS_THREAD_TIMEOUT values to time")
    p.add_argument("--before", default=None, help="git revision to time against the working tree (rows: the two "
                                                    "versions, idle threads as each package sets them)")
    args = p.parse_args(argv)
    if args.before and args.also:
        raise SystemExit("--before compares two versions at the default setting; give --also without it")
    settings = {name: (value, ROOT) for name, value in SETTINGS.items()}  # row: (OPENBLAS_THREAD_TIMEOUT, package)
    for value in filter(None, args.also.split(",")):
        if not value.strip().isdigit():
            raise SystemExit(f"--also: OPENBLAS_THREAD_TIMEOUT values are integers, got {value!r}")
        settings[f"timeout={value.strip()}"] = (value.strip(), ROOT)
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            from bench_before_after import extract  # noqa: PLC0415

            os.makedirs(os.path.join(tmp, "before"))
            extract(args.before, os.path.join(tmp, "before"), "minifcn")
            settings = {args.before: (None, os.path.join(tmp, "before")), "working tree": (None, ROOT)}
        times = {(s, c): [] for s in settings for c in CONDITIONS}
        for _ in range(args.rounds):
            for condition in CONDITIONS:
                for setting, (value, root) in settings.items():
                    busy = (subprocess.Popen([sys.executable, "-c", "while 1: pass"])
                            if condition != "alone" else None)
                    try:
                        out = os.path.join(tmp, f"run{sum(map(len, times.values()))}")  # a fresh run folder each time
                        seconds = timed_run(args.steps, args.image_size, value, out, args.ranks, root)
                        times[setting, condition].append(seconds)
                        print(f"{setting}, {condition}: {seconds:.1f} s", flush=True)  # each run as it ends
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
    rows = []
    for setting in settings:
        alone = statistics.median(times[setting, "alone"])
        loaded = statistics.median(times[setting, CONDITIONS[1]])
        rows.append((setting, alone, loaded, loaded / alone,
                     " ".join(f"{t:.1f}" for t in times[setting, "alone"]),
                     " ".join(f"{t:.1f}" for t in times[setting, CONDITIONS[1]])))
    ranks = f"--ranks {args.ranks}" if args.ranks else "the default ranks"
    print(f"\n{args.steps} training images ({ranks}, batch 1 a rank, {args.image_size} x {args.image_size}) "
          f"+ 16 held-out images, wall seconds, medians of {args.rounds} rounds")
    print_table(("code" if args.before else "idle BLAS threads", "alone s", "beside busy s", "busy / alone",
                 "alone runs", "busy runs"), rows,
                (None, ".2f", ".2f", ".2f", None, None))


if __name__ == "__main__":
    main()
