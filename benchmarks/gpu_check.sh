#!/usr/bin/env bash
# The whole device check of minifcn's CuPy path, in one command, for a machine with an NVIDIA GPU,
# CuPy >= 14, pytest-xdist and (for the comparison) PyTorch with CUDA:
#
#   bash benchmarks/gpu_check.sh            # logs in $OUT (default: gpu-check-logs/)
#
# 1. env.txt     the GPU, driver, Python and library versions;
# 2. tests.log   every gpu-marked test (tests/test_gpu.py and the CuPy runs of the layer, model,
#                SGD, metrics, checkpoint and training tests) on 8 workers: the first CuPy call of
#                each kernel compiles it, which dominates, and workers share CuPy's kernel cache;
# 3. bench.log   benchmarks/bench_fcn.py --device gpu: full-width FCN-8s forward and training step at
#                1x3x500x500 float32 (and the small model) beside the PyTorch twin, TF32 off on both,
#                peak GPU memory beside PyTorch's max_memory_reserved, per-layer times;
# 4. train.log   the README's training command on the GPU for TRAIN_EPOCHS epochs (default 1), with
#    metrics.jsonl  its per-epoch seconds and scores, to set beside the CPU's.
#
# Each step has its own time limit (TEST_TIMEOUT, BENCH_TIMEOUT, TRAIN_TIMEOUT seconds), so one that
# hangs cannot take the others' time; the defaults (240 + 150 + 90 s) add up to 8 minutes. The exit status is
# the tests' (0: all passed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-logs}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MINIFCN_DEVICE=cpu

{
    date -u
    nvidia-smi || echo "nvidia-smi not found"
    "$PY" - <<'EOF'
import platform
print("python", platform.python_version())
for name in ("numpy", "cupy", "torch", "PIL", "tqdm", "threadpoolctl", "pytest", "xdist"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:  # report, do not stop: the tests say what is missing
        print(name, "MISSING:", exc)
from minifcn.backend import gpu_available
print("minifcn.backend.gpu_available():", gpu_available())
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== gpu-marked tests"
timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -n 8 -m gpu -p no:cacheprovider --durations=10 tests 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

echo "== bench_fcn.py --device gpu"
timeout "${BENCH_TIMEOUT:-150}" "$PY" benchmarks/bench_fcn.py --device gpu --cases 500,small --rounds 5 --layers \
    2>&1 | tee "$OUT/bench.log"

echo "== the README's training command on the GPU (${TRAIN_EPOCHS:-1} epochs)"
run_dir="$(mktemp -d)/shapes-fcn8s-gpu"
timeout "${TRAIN_TIMEOUT:-90}" "$PY" -m minifcn train --device gpu --epochs "${TRAIN_EPOCHS:-1}" --no-progress \
    --out "$run_dir" 2>&1 | tee "$OUT/train.log"
cp "$run_dir/metrics.jsonl" "$OUT/metrics.jsonl" 2>/dev/null || echo "no metrics.jsonl written" | tee -a "$OUT/train.log"

echo "== tests exit status: $tests_rc"
exit "$tests_rc"
