"""Whole-network benchmark: FCN-8s forward, forward+backward and a training step.

Cases (float32): full-width FCN-8s (VGG16, 134 M parameters) at 1x3x224x224
and 1x3x500x500, a small FCN-8s (width 0.125) at 8x3x64x64, and ``recipe``:
the model, batch, loss and SGD of ``minifcn train``'s defaults (taken from
``TrainConfig`` and the training code: today width 0.125, 6 classes, learned
2x upsampling, no dropout, 1x3x96x96: a training crop of the 128 x 128 images; the step of one
rank: ``minifcn train`` runs ``LOCAL_RANKS`` of them side by side, one process each). When PyTorch is installed the same
architecture runs in the same process, interleaved round by round with
minifcn, and the table shows both medians and the ratio. With
``--processes N`` each framework is also timed alone in its own process, N
processes each, alternating; their medians go in a second table.

    python benchmarks/bench_fcn.py                 # the default cases, CPU
    python benchmarks/bench_fcn.py --cases recipe --processes 5   # also each framework in its own process
    python benchmarks/bench_fcn.py --cases 224 --rounds 3 --layers
    python benchmarks/bench_fcn.py --memory        # peak memory of a step, each framework in a child process
    python benchmarks/bench_fcn.py --cases small --one-band-thread   # minifcn's band threads on and off
    python benchmarks/bench_fcn.py --device gpu --cases 500 --layers   # CuPy vs PyTorch CUDA (TF32 off on both)

A training step is forward, softmax cross-entropy (mean over pixels),
backward and SGD with momentum 0.9 and weight decay 5e-4 (biases 2x lr, no
decay; the fixed bilinear upsampling is not updated) on both sides.
Forward+backward counts 3x the forward FLOPs (input and weight gradients).

On the GPU (``--device gpu``) TF32 is off for both (``NVIDIA_TF32_OVERRIDE=0``
before CUDA starts, PyTorch's ``allow_tf32`` flags False, CuPy's ``CUPY_TF32``
unset), every case starts from freed memory (minifcn's column workspaces,
CuPy's memory pools, PyTorch's cache), and a table compares the peak GPU
memory each framework holds from its allocator: the size of CuPy's memory
pool (which keeps every block it ever allocated until freed) beside PyTorch's
``max_memory_reserved``, the like-for-like measure (``max_memory_allocated``
leaves out the cache).
"""
from __future__ import annotations

import argparse
import gc
import json
import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads: idle BLAS threads stop spinning
import subprocess
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import gflops, import_torch, interleaved, machine_line, peak_rss_mb, print_table, sgemm_gflops  # noqa: E402

from minifcn.backend import gpu_available, to_device  # noqa: E402
from minifcn.layers.columns import release_workspaces  # noqa: E402
from minifcn.layers import SoftmaxCrossEntropy  # noqa: E402
from minifcn.models import FCN8s  # noqa: E402
from minifcn.models.trace import fcn_flops  # noqa: E402
from minifcn.optim import SGD  # noqa: E402
from minifcn.train import TrainConfig, build_from_config, make_datasets, make_loss, training_crop  # noqa: E402

CASES = {  # name: (width, batch, side); "recipe" takes all three from TrainConfig
    "224": (1.0, 1, 224),
    "320": (1.0, 1, 320),
    "500": (1.0, 1, 500),
    "small": (0.125, 8, 64),
    "recipe": None,
}
DEFAULT_CASES = "224,500,small,recipe"
PROCESS_TIMES = ("forward", "forward_backward", "step", "sgd")


def case_geometry(case):
    """(width, batch, side) of a case; ``recipe``'s side is that of the training crops (or images)."""
    if CASES[case] is None:
        cfg = TrainConfig()
        return cfg.width, cfg.batch_size, training_crop(cfg) or cfg.image_size
    return CASES[case]


def synchronize(device):
    if device == "gpu":
        import cupy  # noqa: PLC0415

        cupy.cuda.Device().synchronize()


def gpu_line(torch=None) -> str:
    """The GPU, CUDA, CuPy (and PyTorch/cuDNN) versions and TF32's state, for the top of a GPU report."""
    import cupy  # noqa: PLC0415

    runtime = cupy.cuda.runtime
    props = runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]

    def version(v):
        return f"{v // 1000}.{v % 1000 // 10}"

    line = (f"GPU: {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB; CUDA runtime {version(runtime.runtimeGetVersion())}, "
            f"driver {version(runtime.driverGetVersion())}; CuPy {cupy.__version__}; "
            f"TF32 off (NVIDIA_TF32_OVERRIDE={os.environ.get('NVIDIA_TF32_OVERRIDE')}, "
            f"CUPY_TF32={os.environ.get('CUPY_TF32', 'unset')}")
    if torch is not None:
        line += (f", torch allow_tf32 {torch.backends.cuda.matmul.allow_tf32}/{torch.backends.cudnn.allow_tf32}"
                 f"; PyTorch {torch.__version__} with cuDNN {torch.backends.cudnn.version()}")
    return line + ")"


def free_gpu_memory(torch=None) -> None:
    """Between cases: drop minifcn's column workspaces and give CuPy's pooled blocks and
    PyTorch's cache back to the device, so a case's peak is its own."""
    import cupy  # noqa: PLC0415

    release_workspaces()
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    cupy.get_default_pinned_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def gpu_peaks_mb(torch=None):
    """(minifcn, PyTorch) peak GPU memory held since the last :func:`free_gpu_memory`, in MiB:
    CuPy's pool size (it keeps every block until freed) and PyTorch's max_memory_reserved."""
    import cupy  # noqa: PLC0415

    mine = cupy.get_default_memory_pool().total_bytes() / 2**20
    theirs = torch.cuda.max_memory_reserved() / 2**20 if torch is not None else None
    return mine, theirs


class MinifcnRunner:
    """Forward / forward+backward / step closures for one minifcn model and batch.

    The fixed cases use FCN-8s with 21 classes and the model's defaults (dropout 0.5,
    fixed bilinear upsampling), lr 1e-4. ``recipe`` builds model, loss and SGD as
    ``minifcn train`` does with its defaults (``TrainConfig()``).
    """

    def __init__(self, case, device="cpu", seed=0):
        self.device = device
        width, batch, side = case_geometry(case)
        if CASES[case] is None:
            cfg = TrainConfig(seed=seed)
            classes = make_datasets(cfg)[0].num_classes
            self.model = build_from_config(cfg, classes).to(device)
            self.loss = make_loss(self.model, cfg.reduction)
            self.opt = SGD(self.model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            classes = 21
            self.model = FCN8s(classes, width, seed=seed).to(device)
            self.loss = SoftmaxCrossEntropy()
            self.opt = SGD(self.model, lr=1e-4, momentum=0.9, weight_decay=5e-4)
        self.model.input_grad = False  # as in PyTorch (and in training), where the input needs no gradient
        rng = np.random.default_rng(seed)
        # small nonzero score layers so the gradient reaches the whole network
        for name, p in self.model.named_parameters():
            if name.startswith("score"):
                p.data[...] = to_device(rng.standard_normal(p.shape).astype(np.float32) * 1e-3, device)
        self.x = to_device(rng.standard_normal((batch, 3, side, side)).astype(np.float32), device)
        self.labels = to_device(rng.integers(0, classes, (batch, side, side)), device)

    def forward(self):
        self.model.eval()
        self.model(self.x)
        self.model.train()
        synchronize(self.device)

    def forward_backward(self):
        self.model.zero_grad()
        self.loss(self.model(self.x), self.labels)
        self.model.backward(self.loss.backward())
        synchronize(self.device)

    def step(self):
        self.forward_backward()
        self.opt.step()
        synchronize(self.device)

    def sgd(self):
        """The optimiser update alone (momentum and weight decay over every parameter)."""
        self.opt.step()
        synchronize(self.device)


class TorchRunner:
    def __init__(self, torch, minifcn_runner, device="cpu"):
        from torch_fcn import TorchFCN, torch_sgd  # noqa: PLC0415

        self.torch = torch
        self.dev = "cuda" if device == "gpu" else "cpu"
        self.model = TorchFCN(minifcn_runner.model.to("cpu")).to(self.dev)
        minifcn_runner.model.to(device)
        from minifcn.backend import to_numpy  # noqa: PLC0415

        self.x = torch.from_numpy(to_numpy(minifcn_runner.x)).to(self.dev)
        self.labels = torch.from_numpy(to_numpy(minifcn_runner.labels)).to(self.dev)
        opt = minifcn_runner.opt
        self.opt = torch_sgd(self.model, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
        self.ignore_index, self.reduction = minifcn_runner.loss.ignore_index, minifcn_runner.loss.reduction

    def sync(self):
        if self.dev == "cuda":
            self.torch.cuda.synchronize()

    def forward(self):
        self.model.eval()
        with self.torch.no_grad():
            self.model(self.x)
        self.model.train()
        self.sync()

    def forward_backward(self):
        self.opt.zero_grad(set_to_none=False)
        out = self.model(self.x)
        self.torch.nn.functional.cross_entropy(out, self.labels, ignore_index=self.ignore_index,
                                               reduction=self.reduction).backward()
        self.sync()

    def step(self):
        self.forward_backward()
        self.opt.step()
        self.sync()

    def sgd(self):
        self.opt.step()
        self.sync()


def one_band_thread(fn):
    """``fn`` run with minifcn's band threads off (MINIFCN_NUM_THREADS=1), the setting restored after."""
    def run():
        before = os.environ.get("MINIFCN_NUM_THREADS")
        os.environ["MINIFCN_NUM_THREADS"] = "1"
        try:
            fn()
        finally:
            if before is None:
                del os.environ["MINIFCN_NUM_THREADS"]
            else:
                os.environ["MINIFCN_NUM_THREADS"] = before
    return run


def layer_profile(runner, what="step", repeats=2):
    """Seconds per layer (forward and backward) of minifcn, by wrapping each leaf layer."""
    totals = defaultdict(float)
    originals = []
    for name, module in runner.model.named_modules():
        if name == "" or module._children:
            continue
        for kind in ("forward", "backward"):
            fn = getattr(module, kind)

            def timed(*a, _fn=fn, _key=(name, kind), **k):
                synchronize(runner.device)
                t0 = time.perf_counter()
                out = _fn(*a, **k)
                synchronize(runner.device)
                totals[_key] += time.perf_counter() - t0
                return out

            originals.append((module, kind))
            object.__setattr__(module, kind, timed)
    try:
        getattr(runner, what)()  # warm
        totals.clear()
        t0 = time.perf_counter()
        for _ in range(repeats):
            getattr(runner, what)()
        whole = (time.perf_counter() - t0) / repeats
    finally:
        for module, kind in originals:
            object.__delattr__(module, kind)
    return {k: v / repeats for k, v in totals.items()}, whole


def block_of(name):
    """conv1..conv5 (with their ReLUs and pool), fc6/fc7, or head (scores, upsampling, crops)."""
    for i in "12345":
        if name == f"pool{i}" or name.startswith((f"conv{i}_", f"relu{i}_")):
            return f"conv{i}"
    if name in ("fc6", "relu6", "drop6", "fc7", "relu7", "drop7"):
        return "fc6/fc7"
    return "head"


def print_layers(profile, whole, flops):
    per_layer, total = profile, sum(profile.values())
    rows = []
    for (name, kind), sec in sorted(per_layer.items(), key=lambda kv: -kv[1])[:15]:
        gf = flops.get(name, 0) * (1 if kind == "forward" else 2)
        rows.append((name, kind, 1e3 * sec, 100 * sec / whole, gflops(gf, sec) if gf else None))
    print_table(("layer", "pass", "ms", "% of step", "GFLOP/s"), rows, (None, None, ".1f", ".1f", ".0f"))
    blocks = defaultdict(float)
    for (name, _), sec in per_layer.items():
        blocks[block_of(name)] += sec
    print("by block: " + ", ".join(f"{k} {100 * v / whole:.0f} %" for k, v in sorted(blocks.items(), key=lambda kv: -kv[1]))
          + f"; outside layers (loss, SGD, Python) {100 * (whole - total) / whole:.0f} %")


def child(framework, case, device, rounds=None):
    """One framework alone in this process; print JSON: with ``rounds``, the median seconds of
    forward, forward+backward, step and SGD over interleaved rounds, else the peak memory of 2 steps."""
    base = peak_rss_mb()
    runner = MinifcnRunner(case, device)
    if framework == "torch":
        torch = import_torch()
        runner = TorchRunner(torch, runner, device)
    if rounds:
        times = interleaved({what: getattr(runner, what) for what in PROCESS_TIMES}, rounds=rounds, warmup=1)
        print(json.dumps({what: t.median for what, t in times.items()}))
        return
    for _ in range(2):
        runner.step()
    result = {"peak_rss_mb": peak_rss_mb(), "start_rss_mb": base}
    if device == "gpu":
        mine, theirs = gpu_peaks_mb(torch if framework == "torch" else None)
        result["peak_gpu_mb"] = theirs if framework == "torch" else mine
    print(json.dumps(result))


def memory_table(cases, device, use_torch):
    rows, per_gflop = [], {}
    for case in cases:
        res = {fw: _child_json(fw, case, device) for fw in (("minifcn", "torch") if use_torch else ("minifcn",))}
        key = "peak_gpu_mb" if device == "gpu" else "peak_rss_mb"
        mine = res["minifcn"][key]
        theirs = res.get("torch", {}).get(key)
        rows.append((case, mine, theirs, (mine / theirs) if theirs else None))
    what = "peak GPU memory (MiB)" if device == "gpu" else "peak RSS of a process doing 2 training steps (MiB)"
    print(f"\nMemory: {what}")
    print_table(("case", "minifcn", "PyTorch", "ratio"), rows, (None, ".0f", ".0f", ".2f"))


def _child_json(framework, case, device, *extra):
    out = subprocess.run([sys.executable, __file__, "--child", framework, "--cases", case, "--device", device,
                          *extra], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def process_table(cases, device, use_torch, processes, rounds):
    """Each framework alone in its own process (``processes`` each, alternating); medians over the processes."""
    frameworks = ("minifcn", "torch") if use_torch else ("minifcn",)
    rows = []
    for case in cases:
        runs = defaultdict(list)
        for _ in range(processes):
            for fw in frameworks:
                runs[fw].append(_child_json(fw, case, device, "--child-rounds", str(rounds)))
        width, batch, side = case_geometry(case)
        for what in PROCESS_TIMES:
            mine = float(np.median([r[what] for r in runs["minifcn"]]))
            theirs = float(np.median([r[what] for r in runs["torch"]])) if use_torch else None
            rows.append((f"{case} ({batch}x3x{side}x{side}, width {width:g})", what.replace("_", "+"), 1e3 * mine,
                         1e3 * theirs if theirs else None, mine / theirs if theirs else None))
    print(f"\nEach framework alone in its own process: medians over {processes} processes per framework "
          f"(alternating), each the median of {rounds} rounds")
    print_table(("case", "what", "minifcn ms", "PyTorch ms", "ratio"), rows, (None, None, ".0f", ".0f", ".2f"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=DEFAULT_CASES, help="comma list of: " + ", ".join(CASES))
    p.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--layers", action="store_true", help="per-layer breakdown of minifcn's training step")
    p.add_argument("--memory", action="store_true", help="peak memory of each framework (child processes)")
    p.add_argument("--one-band-thread", action="store_true",
                   help="also time minifcn with MINIFCN_NUM_THREADS=1, interleaved, and print the ratio")
    p.add_argument("--processes", type=int, default=0,
                   help="also time each framework alone in its own process, this many processes each (alternating)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-rounds", type=int, default=0, help=argparse.SUPPRESS)  # 0: the child measures memory
    args = p.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    if args.device == "gpu" and not gpu_available():
        p.error("--device gpu needs CuPy with a visible CUDA device (see docs/gpu.md)")
    if args.child:
        return child(args.child, cases[0], args.device, args.child_rounds)

    if args.device == "gpu":
        os.environ["NVIDIA_TF32_OVERRIDE"] = "0"  # before CUDA starts: no TF32 in cuBLAS or cuDNN, for either side
    torch = None if args.no_torch else import_torch()
    if torch is not None and args.device == "gpu":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    print(machine_line(torch))
    if args.device == "gpu":
        print(gpu_line(torch))
    if args.device == "cpu":
        ceiling = sgemm_gflops()
        print(f"float32 matrix-product ceiling (2048^3 sgemm): {ceiling['median_gflops']:.0f} GFLOP/s (median)")
    else:
        ceiling = None
    rows, per_gflop, thread_rows, gpu_memory_rows = [], {}, [], []
    for case in cases:
        width, batch, side = case_geometry(case)
        if args.device == "gpu":
            free_gpu_memory(torch)
        mine = MinifcnRunner(case, args.device)
        fwd_flops = sum(fcn_flops(mine.model, side, side, batch).values())
        candidates = {}
        theirs = TorchRunner(torch, mine, args.device) if torch is not None else None
        for what in ("forward", "forward_backward", "step", "sgd"):
            candidates[f"minifcn {what}"] = getattr(mine, what)
            if args.one_band_thread and what != "sgd":
                candidates[f"minifcn-1 {what}"] = one_band_thread(getattr(mine, what))
            if theirs is not None:
                candidates[f"torch {what}"] = getattr(theirs, what)
        results = interleaved(candidates, rounds=args.rounds, warmup=1)
        if args.one_band_thread:
            for what in ("forward", "forward_backward", "step"):
                m, one = results[f"minifcn {what}"].median, results[f"minifcn-1 {what}"].median
                thread_rows.append((case, what.replace("_", "+"), 1e3 * m, 1e3 * one, m / one))
        for what, factor in (("forward", 1), ("forward_backward", 3), ("step", 3), ("sgd", 0)):
            m = results[f"minifcn {what}"].median
            t = results[f"torch {what}"].median if theirs is not None else None
            gf = gflops(factor * fwd_flops, m) if factor else None
            share = f"{100 * gf / ceiling['median_gflops']:.0f} %" if ceiling and gf else ""
            ms_per_gflop = 1e3 * m / (factor * fwd_flops / 1e9) if factor else None
            if what == "forward":
                per_gflop[case] = ms_per_gflop
            rows.append((f"{case} ({batch}x3x{side}x{side}, width {width:g})", what.replace("_", "+"),
                         1e3 * m, 1e3 * t if t else None, m / t if t else None, gf, share, ms_per_gflop))
        if args.layers:
            profile, whole = layer_profile(mine, "step")
            print(f"\nminifcn per-layer time of a training step, case {case} ({1e3 * whole:.0f} ms):")
            print_layers(profile, whole, fcn_flops(mine.model, side, side, batch))
        if args.device == "gpu":
            m, t = gpu_peaks_mb(torch)
            gpu_memory_rows.append((case, m, t, m / t if t else None))
        del mine, theirs, candidates
    print()
    print_table(("case", "what", "minifcn ms", "PyTorch ms", "ratio", "minifcn GFLOP/s", "of ceiling",
                 "ms per GFLOP"), rows, (None, None, ".0f", ".0f", ".2f", ".0f", None, ".2f"))
    if gpu_memory_rows:
        print("\nPeak GPU memory of the case (MiB): CuPy's pool (minifcn) beside PyTorch's max_memory_reserved")
        print_table(("case", "minifcn", "PyTorch", "ratio"), gpu_memory_rows, (None, ".0f", ".0f", ".2f"))
    if thread_rows:
        print("\nminifcn with its band threads against MINIFCN_NUM_THREADS=1 (same run, interleaved):")
        print_table(("case", "what", "threads ms", "one thread ms", "ratio"), thread_rows,
                    (None, None, ".0f", ".0f", ".2f"))
    full_width = {c: v for c, v in per_gflop.items() if c in ("224", "320", "500")}
    if len(full_width) > 1:  # cost growth: time per forward GFLOP (counted from the real layer shapes)
        spread = max(full_width.values()) / min(full_width.values()) - 1
        print("\nforward ms per GFLOP: " + ", ".join(f"{c}: {v:.2f}" for c, v in full_width.items())
              + f"; largest / smallest - 1 = {100 * spread:.0f} % (target <= 20 %)")
    if args.processes:
        process_table(cases, args.device, torch is not None, args.processes, args.rounds)
    if args.memory:
        memory_table(cases, args.device, torch is not None)


if __name__ == "__main__":
    main()
