"""Data-parallel training over MPI: throughput of N processes against one, and the gradient allreduce.

    python benchmarks/bench_distributed.py                  # both parts, 2 ranks
    python benchmarks/bench_distributed.py --ranks 2 --steps 8 --part steps
    python benchmarks/bench_distributed.py --part allreduce  # the full-width model's 134 M-parameter gradients

Part "steps": training steps of the small FCN-8s (width 0.125, float32, the
recipe's 128 x 128 shapes images, SGD with momentum) as ``minifcn train``
takes them: forward, loss, the global loss reduction, backward, the gradient
average, SGD. Rows: one process with batch b; one process with batch N b (the
same global batch); N ranks of batch b each (``mpiexec -n N``). Per row:
images per second, the median step, the allreduce of the gradients per step
(timed after a barrier, so it is the transfer and not the wait for the
slowest rank), its share of the step, and the bytes each rank hands to it.

Part "allreduce": the gradients of the full-width FCN-8s (the paper's VGG16,
134 M parameters, 537 MB in float32) averaged over N ranks, by the two routes
of :mod:`minifcn.distributed` (buckets of 64 MiB, one bucket, one call per
parameter), interleaved. Then what a step's bytes would cost between machines:
a ring allreduce sends and receives ``2 (N - 1) / N`` times the buffer per
rank, so at a link of L bit/s a step's allreduce takes at least
``2 (N - 1) / N * bytes * 8 / L`` seconds.

The children run this same file with ``--worker``; the parent prints the tables.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads: idle BLAS threads stop spinning
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from common import machine_line, print_table  # noqa: E402

from minifcn.data import DataLoader, IMAGENET_MEAN_RGB, get_dataset  # noqa: E402
from minifcn.distributed import BUCKET_BYTES, global_loss, world  # noqa: E402
from minifcn.models import FCN8s  # noqa: E402
from minifcn.optim import SGD  # noqa: E402
from minifcn.layers import SoftmaxCrossEntropy  # noqa: E402

LINKS_GBIT = (10, 100)


def _mpiexec():
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.isfile(beside) else "mpiexec"


def worker_steps(batch: int, steps: int, warmup: int, image_size: int):
    """Training steps on this rank; returns the medians (rank 0) as a dict."""
    comm = world()
    model = FCN8s(num_classes=6, width=0.125, learn_upsampling=True, dropout=0.0)
    model.input_grad = False
    optimizer = SGD(model, lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = SoftmaxCrossEntropy()
    dataset = get_dataset("shapes", split="train", num_images=(steps + warmup) * batch * comm.size,
                          image_size=image_size)
    loader = DataLoader(dataset, batch, shuffle=True, flip=True, drop_last=True, mean=IMAGENET_MEAN_RGB,
                        scale=0.017, num_shards=comm.size, shard=comm.rank)
    comm.broadcast_arrays([p.data for p in model.parameters()])
    average = comm.gradient_averager(optimizer.named_params)
    step_s, reduce_s = [], []
    for i, (images, labels) in enumerate(loader.epoch(0)):
        comm.barrier()
        t0 = time.perf_counter()
        model.zero_grad()
        loss_fn(model(images), labels)
        _, scale = global_loss(comm, loss_fn)
        model.backward(loss_fn.backward(scale))
        t1 = time.perf_counter()
        comm.barrier()  # the allreduce timed alone, not the wait for the slowest rank
        t2 = time.perf_counter()
        average()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if i >= warmup:
            step_s.append((t1 - t0) + (t3 - t2) + (t4 - t3))  # the step without the timing barrier
            reduce_s.append(t3 - t2)
    return {"step_s": statistics.median(step_s), "allreduce_s": statistics.median(reduce_s),
            "bytes": average.nbytes, "images_per_step": batch * comm.size, "threads": os.environ.get(
                "MINIFCN_NUM_THREADS", "all cores")}


def worker_allreduce(rounds: int, width: float):
    """An FCN-8s's trainable gradients averaged by each route, interleaved; medians (rank 0)."""
    comm = world()
    model = FCN8s(num_classes=21, width=width, learn_upsampling=True, dropout=0.0)
    params = [p for p in model.parameters() if p.trainable]
    for p in params:
        p.grad[...] = 1.0
    routes = {"buckets of 64 MiB": comm.gradient_averager(params, "buckets", BUCKET_BYTES),
              "one bucket": comm.gradient_averager(params, "buckets", 1 << 40)}
    # (the second averager re-attaches the gradients to its own bucket; each re-attaches before it runs)
    routes["one call per parameter"] = comm.gradient_averager(params, "per-parameter")
    times = {name: [] for name in routes}
    for _ in range(rounds):
        for name, average in routes.items():
            if name != "one call per parameter":
                average.buckets.buffers()  # attach the gradients to this route's buckets before timing
            comm.barrier()
            t0 = time.perf_counter()
            average()
            times[name].append(time.perf_counter() - t0)
    check = float(params[0].grad.ravel()[0])  # every rank held ones: the average is still one
    assert abs(check - 1.0) < 1e-6, check
    return {"parameters": sum(p.size for p in params), "bytes": routes["buckets of 64 MiB"].nbytes,
            "buckets": len(routes["buckets of 64 MiB"].buckets.buffers_),
            "routes": {name: statistics.median(t) for name, t in times.items()},
            "per_parameter_calls": len(params)}


def run_child(ranks: int, args: list, env_extra=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(env_extra or {})
    command = [sys.executable, os.path.abspath(__file__), "--worker", *args]
    if ranks > 1:
        command = [_mpiexec(), "-n", str(ranks), *command]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(command)}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ring_seconds(nbytes: int, ranks: int, gbit: float) -> float:
    """The least time a ring allreduce of ``nbytes`` over ``ranks`` machines needs on a ``gbit`` Gbit/s link."""
    return 2 * (ranks - 1) / ranks * nbytes * 8 / (gbit * 1e9)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="images per rank per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="allreduce part: interleaved rounds")
    parser.add_argument("--widths", default="0.125,1.0", help="allreduce part: FCN-8s widths")
    parser.add_argument("--width", type=float, default=1.0, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=("steps", "allreduce", "both"), default="both")
    parser.add_argument("--worker", choices=("steps", "allreduce"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = (worker_steps(args.batch, args.steps, args.warmup, args.image_size) if args.worker == "steps"
                  else worker_allreduce(args.rounds, args.width))
        if world().rank == 0:
            print(json.dumps(result), flush=True)
        return

    print(f"machine: {machine_line()}")
    n, b = args.ranks, args.batch
    if args.part in ("steps", "both"):
        common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--image-size", str(args.image_size)]
        rows = []
        for label, ranks, batch in ((f"1 process, batch {b}", 1, b), (f"1 process, batch {n * b}", 1, n * b),
                                    (f"{n} ranks x batch {b}", n, b)):
            r = run_child(ranks, ["steps", "--batch", str(batch), *common])
            rows.append((label, r["threads"], r["images_per_step"], r["images_per_step"] / r["step_s"],
                         1e3 * r["step_s"], 1e3 * r["allreduce_s"], 100 * r["allreduce_s"] / r["step_s"],
                         r["bytes"] / 1e6 if ranks > 1 else 0.0))
        print(f"\nsmall FCN-8s (width 0.125, float32), {args.image_size}x{args.image_size} shapes images, medians of "
              f"{args.steps} steps after {args.warmup}:")
        print_table(("run", "band threads", "images/step", "images/s", "step ms", "allreduce ms", "allreduce %",
                     "MB reduced/step"), rows, (None, None, None, ".2f", ".0f", ".1f", ".1f", ".1f"))
    if args.part in ("allreduce", "both"):
        print(f"\ngradient allreduce of FCN-8s (float32), {n} ranks on this machine, medians of {args.rounds} "
              f"interleaved rounds:")
        rows, sizes = [], []
        for width in (float(w) for w in args.widths.split(",")):
            r = run_child(n, ["allreduce", "--rounds", str(args.rounds), "--width", str(width)])
            sizes.append((width, r["parameters"], r["bytes"]))
            for name, seconds in r["routes"].items():
                calls = r["buckets"] if name.startswith("buckets") else (1 if name == "one bucket" else
                                                                         r["per_parameter_calls"])
                rows.append((f"width {width:g}", r["parameters"], r["bytes"] / 1e6, name, calls, 1e3 * seconds,
                             r["bytes"] / seconds / 1e9))
        print_table(("model", "parameters", "MB", "route", "Allreduce calls", "ms", "GB/s of gradients"), rows,
                    (None, None, ".1f", None, None, ".1f", ".2f"))
        print("\nbetween machines (ring allreduce, 2 (N-1)/N x the bytes per rank; a lower bound, no latency):")
        rows = [(f"width {width:g}", machines, *(1e3 * ring_seconds(nbytes, machines, g) for g in LINKS_GBIT))
                for width, _, nbytes in sizes for machines in (2, 8)]
        print_table(("model", "machines") + tuple(f"ms/step at {g} Gbit/s" for g in LINKS_GBIT), rows,
                    (None, None, ".1f", ".1f"))


if __name__ == "__main__":
    main()
