"""Shared helpers for minifcn's benchmark scripts.

Import this module *before* NumPy is first imported in a benchmark script:
it sets ``OPENBLAS_THREAD_TIMEOUT`` (see :data:`OPENBLAS_ENV`), which OpenBLAS
reads only when it is loaded.

What is here:

* :func:`machine_line` / :func:`machine_info`: CPU, cores, memory, NumPy and
  its BLAS (with its thread count), PyTorch if installed.
* :func:`import_torch`: PyTorch or None, with its thread count set to the one
  NumPy's BLAS uses, so both libraries get the same cores.
* :func:`interleaved`: times several candidates in rounds (A, B, A, B, ...)
  after warm-up and returns the median and minimum per call.
* :func:`sgemm_gflops`: this machine's float32 matrix-product ceiling.
* :func:`peak_rss_mb`, :func:`format_table`, :func:`print_table`.
* :func:`conv_flops`, :func:`conv_transpose_flops`: multiply-adds counted as 2 FLOPs.

Everything is float32: a float64 scalar mixed into a float32 array promotes it
(NumPy 2) and the products then run several times slower.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

# OpenBLAS worker threads keep spinning on a core after each product (default
# timeout about 2^28 cycles). On a small machine they then steal a core from
# whatever runs next, including the other library of an interleaved
# comparison. A short timeout lets them sleep. Only effective before NumPy loads.
OPENBLAS_ENV = {"OPENBLAS_THREAD_TIMEOUT": "4"}
# Variables that override OpenBLAS's own choice of kernels and blocking for this CPU. Some machines set
# them (older OpenBLAS builds misjudged some processors); a current one may then run at half speed, so
# machine_line names them beside every figure.
OPENBLAS_CHOICES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
if "numpy" not in sys.modules:
    for _k, _v in OPENBLAS_ENV.items():
        os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402  (after the environment is set)

# ---------------------------------------------------------------------------
# Machine description
# ---------------------------------------------------------------------------


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo with its family and model numbers (or platform's guess elsewhere).

    The numbers tell processors apart that share a name: a VM's "AMD EPYC" is a Zen 2 (family 23 model 49),
    a Zen 3 (25, 1), a Zen 4 (25, 17) or a Zen 5 (26, 2), whose speed ratios against PyTorch differ."""
    fields = {}
    try:
        with open(cpuinfo) as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine()
    if fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def usable_cores() -> int:
    """Cores this process may run on (affinity), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _openblas_library():
    """The loaded OpenBLAS shared library as a ctypes handle, or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line.split()[-1]}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def blas_info() -> dict:
    """Name, version and thread count of NumPy's BLAS, as far as can be found out cheaply."""
    info = {"name": "unknown", "version": "", "threads": None, "kernels": None}
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        info["name"], info["version"] = blas.get("name", "unknown"), str(blas.get("version", ""))
    except Exception:  # older NumPy: no mode="dicts"
        pass
    lib = _openblas_library()
    if lib is not None:
        for sym in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_",
                    "scipy_openblas_get_num_threads", "openblas_get_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_int
                info["threads"] = int(fn())
                break
        for sym in ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                    "scipy_openblas_get_corename", "openblas_get_corename"):
            fn = getattr(lib, sym, None)
            if fn is not None:  # the kernels OpenBLAS chose for this CPU (or OPENBLAS_CORETYPE forced)
                fn.restype = ctypes.c_char_p
                info["kernels"] = fn().decode(errors="replace").strip()
                break
    if info["threads"] is None:
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if os.environ.get(var, "").isdigit():
                info["threads"] = int(os.environ[var])
                break
    return info


def set_blas_threads(threads: int) -> bool:
    """Set NumPy's OpenBLAS thread count at run time; False if that is not possible here."""
    lib = _openblas_library()
    if lib is None:
        return False
    for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_",
                "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
        fn = getattr(lib, sym, None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            fn.restype = None
            fn(int(threads))
            return True
    return False


def blas_threads() -> int:
    """Threads NumPy's BLAS uses (default: the usable core count)."""
    return blas_info()["threads"] or usable_cores()


_torch = None
_torch_checked = False

# Spins of PyTorch's idle OpenMP threads (GNU libgomp, read when torch loads) before they sleep; libgomp's own
# default is 300,000. The twin of OPENBLAS_THREAD_TIMEOUT for minifcn's BLAS: in one process, threads left
# spinning after one framework's call take the cores from the other's next call. Where the variable is already
# set, it is left as it is (GOMP_SPINCOUNT=300000 measures libgomp's default).
TORCH_SPINCOUNT = "10000"


def import_torch(threads: int | None = None):
    """Return the ``torch`` module, or None if it is not installed.

    Sets ``torch.set_num_threads`` to ``threads`` (default: NumPy's BLAS
    thread count) so both libraries run on the same number of cores, and
    ``GOMP_SPINCOUNT`` to :data:`TORCH_SPINCOUNT` (unless set) before torch loads.
    """
    global _torch, _torch_checked
    if not _torch_checked:
        _torch_checked = True
        os.environ.setdefault("GOMP_SPINCOUNT", TORCH_SPINCOUNT)
        try:
            import torch  # noqa: PLC0415 (optional)
        except ImportError:
            torch = None
        _torch = torch
    if _torch is not None:
        _torch.set_num_threads(threads or blas_threads())
    return _torch


def band_threads() -> str:
    """minifcn's band workers (minifcn.parallel), or why there is only one."""
    from minifcn import parallel  # noqa: PLC0415

    if parallel._blas_controller() is None:
        return "1 (threadpoolctl missing or no BLAS it can limit)"
    count = parallel.num_threads()
    return f"{count} (batches of 2 or more images)" if count > 1 else "1"


def machine_info(torch=None) -> dict:
    blas = blas_info()
    flags = cpu_flags()
    simd = next((s for s in ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd") if s in flags), "")
    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "simd": "avx512" if simd == "avx512f" else simd,
        "memory_gb": total_memory_gb(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": f"{blas['name']} {blas['version']}".strip(),
        "blas_threads": blas["threads"] or usable_cores(),
        "blas_kernels": blas["kernels"],
        "openblas_forced": {v: os.environ[v] for v in OPENBLAS_CHOICES if os.environ.get(v)},
        "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "torch": None,
        "torch_threads": None,
        "band_threads": band_threads(),
    }
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_spincount"] = os.environ.get("GOMP_SPINCOUNT", "unset (300000)")
    return info


def machine_line(torch=None) -> str:
    """One line describing the machine and the libraries, for the top of a report."""
    i = machine_info(torch)
    mem = f", {i['memory_gb']:.0f} GB" if i["memory_gb"] else ""
    simd = f" ({i['simd']})" if i["simd"] else ""
    kernels = f"{i['blas_kernels']} kernels, " if i["blas_kernels"] else ""
    if i["openblas_forced"]:  # a forced choice changes the ceiling: say so beside every figure
        kernels += "forced by " + " ".join(f"{k}={v}" for k, v in i["openblas_forced"].items()) + ", "
    line = (f"{i['cpu']}, {i['cores']} cores{simd}{mem}; Python {i['python']}, NumPy {i['numpy']} "
            f"with {i['blas']} ({kernels}threads: {i['blas_threads']})")
    line += f"; minifcn band threads: {i['band_threads']}"
    if i["torch"]:
        line += f"; PyTorch {i['torch']} (threads: {i['torch_threads']}, GOMP_SPINCOUNT={i['torch_spincount']})"
    else:
        import importlib.util  # noqa: PLC0415

        line += "; PyTorch not used" if importlib.util.find_spec("torch") else "; PyTorch not installed"
    return line


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one candidate over all rounds."""
    name: str
    samples: list = field(default_factory=list)
    number: int = 1  # calls per sample

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median_ms(self) -> float:
        return 1e3 * self.median

    @property
    def min_ms(self) -> float:
        return 1e3 * self.min


def _time_calls(fn, number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def interleaved(candidates, rounds: int = 5, warmup: int = 1, min_sample_s: float = 0.0) -> dict:
    """Time several candidates in interleaved rounds.

    Inputs:
        candidates: mapping name -> zero-argument callable (or a list of pairs).
            A callable must finish its own work before returning (NumPy does;
            for asynchronous GPU code, synchronise inside the callable).
        rounds: timed rounds; in each, every candidate runs once, in order.
        warmup: untimed calls of each candidate first (first-touch allocation,
            caches, thread pools), also interleaved.
        min_sample_s: a candidate faster than this is called several times per
            sample (number chosen from the warm-up) so timer noise stays small.
    Returns:
        {name: Timing} with per-call seconds: ``.median``, ``.min``, ``.samples``.
    """
    items = list(candidates.items()) if hasattr(candidates, "items") else list(candidates)
    results = {name: Timing(name) for name, _ in items}
    warm = {name: math.inf for name, _ in items}
    for _ in range(max(warmup, 1 if min_sample_s > 0 else 0)):
        for name, fn in items:
            warm[name] = min(warm[name], _time_calls(fn, 1))
    for name, _ in items:
        if min_sample_s > 0 and warm[name] < min_sample_s:
            results[name].number = max(1, math.ceil(min_sample_s / max(warm[name], 1e-7)))
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(rounds):
            for name, fn in items:
                results[name].samples.append(_time_calls(fn, results[name].number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return results


def sgemm_gflops(n: int = 2048, rounds: int = 5, seed: int = 0) -> dict:
    """Measured float32 matrix-product ceiling: an ``n x n x n`` product, ``2 n^3`` FLOPs.

    Returns {"n", "median_gflops", "max_gflops", "median_ms"}.
    """
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    t = interleaved({"sgemm": lambda: np.matmul(a, b, out=c)}, rounds=rounds, warmup=1)["sgemm"]
    flops = 2.0 * n ** 3
    return {"n": n, "median_gflops": flops / t.median / 1e9, "max_gflops": flops / t.min / 1e9,
            "median_ms": t.median_ms}


# ---------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (VmHWM, else ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------
# FLOP counts (a multiply-add is 2 FLOPs)
# ---------------------------------------------------------------------------


def conv_flops(n: int, cin: int, cout: int, oh: int, ow: int, kh: int, kw: int) -> int:
    """Forward FLOPs of a convolution: ``2 N Cout OH OW Cin kh kw`` (bias not counted).

    Forward+backward (input and weight gradients) is 3 times this.
    """
    return 2 * n * cout * oh * ow * cin * kh * kw


def conv_transpose_flops(n: int, cin: int, cout: int, h: int, w: int, kh: int, kw: int) -> int:
    """Forward FLOPs of a transposed convolution on an (N, Cin, H, W) *input*:
    ``2 N Cin H W Cout kh kw`` (every input pixel scatters a Cout x kh x kw patch).

    It equals :func:`conv_flops` of the convolution it transposes; forward+backward is 3 times this.
    """
    return 2 * n * cin * h * w * cout * kh * kw


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


# ---------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------


def _cell(value, fmt: str | None = None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if fmt:
            return format(value, fmt)
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def format_table(headers, rows, formats=None, markdown: bool = False) -> str:
    """Aligned text table: text columns left-aligned, numeric columns right-aligned.

    Inputs:
        headers: column names; rows: sequences of cells (str, int, float or None).
        formats: optional per-column format specs for floats (e.g. ".1f"), None for the default.
        markdown: a GitHub Markdown table (still aligned) instead of plain text.
    """
    formats = list(formats or [None] * len(headers))
    cells = [[_cell(v, formats[k]) for k, v in enumerate(row)] for row in rows]
    numeric = [all(isinstance(row[k], (int, float)) or row[k] is None for row in rows) and rows != []
               for k in range(len(headers))]
    widths = [max([len(h)] + [len(r[k]) for r in cells]) for k, h in enumerate(headers)]

    def line(values):
        parts = [v.rjust(widths[k]) if numeric[k] else v.ljust(widths[k]) for k, v in enumerate(values)]
        return ("| " + " | ".join(parts) + " |") if markdown else "  ".join(parts).rstrip()

    out = [line(list(headers))]
    if markdown:
        out.append("|" + "|".join(("-" * (w + 1) + ":") if numeric[k] else ("-" * (w + 2))
                                  for k, w in enumerate(widths)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def print_table(headers, rows, formats=None, markdown: bool = False, file=None) -> None:
    print(format_table(headers, rows, formats, markdown), file=file or sys.stdout, flush=True)
