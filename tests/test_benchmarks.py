"""Smoke tests of benchmarks/: bench_layers.py --quick and bench_fcn.py's small case run and print their tables;
the helpers in benchmarks/common.py count FLOPs, time and print as documented."""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import common  # noqa: E402

ROWS = ["conv1_1", "conv1_2", "conv3_2", "conv5_2", "fc6", "upscore2", "upscore8", "upscore32", "pool1", "pool4"]


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(BENCH, "bench_layers.py"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _check_table(out, with_torch):
    assert out.startswith("machine: ")
    assert "matrix-product ceiling" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    assert "fwd ms" in lines[header] and "fwd+bwd ms" in lines[header]
    assert ("torch ms" in lines[header]) == with_torch
    table = lines[header + 2:header + 2 + len(ROWS)]
    assert [line.split()[0] for line in table] == ROWS
    for column in ("fwd ms", "fwd+bwd ms"):  # right-aligned: a cell ends where its header ends
        end = lines[header].index(column) + len(column)
        assert all(float(line[:end].split()[-1]) > 0 for line in table)


def test_bench_layers_quick_without_torch():
    proc = _run("--quick", "--no-torch")
    assert proc.returncode == 0, proc.stderr
    _check_table(proc.stdout, with_torch=False)


def test_bench_fcn_small_case_prints_every_row():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_fcn.py"), "--cases", "small", "--rounds", "1",
                           "--no-torch"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("small (")]
    assert [r[4] for r in rows] == ["forward", "forward+backward", "step", "sgd"]
    for r in rows[:3]:  # minifcn ms, then "-" where PyTorch would be, then the ms per GFLOP at the end
        assert float(r[5]) > 0 and r[6] == "-" and float(r[-1]) > 0


def test_bench_fcn_recipe_case_in_one_process_and_in_separate_processes():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_fcn.py"), "--cases", "recipe", "--rounds", "1",
                           "--no-torch", "--processes", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    split = next(i for i, line in enumerate(lines) if line.startswith("Each framework alone in its own process"))
    for table in (lines[:split], lines[split:]):  # interleaved in one process, then one process per framework
        rows = [line.split() for line in table if line.startswith("recipe (1x3x96x96, width 0.125)")]  # a training crop
        assert [r[4] for r in rows] == ["forward", "forward+backward", "step", "sgd"]
        assert all(float(r[5]) > 0 and r[6] == "-" for r in rows)


def test_bench_fcn_recipe_runner_is_the_training_defaults():
    import bench_fcn  # noqa: PLC0415

    from minifcn.train import TrainConfig, training_crop  # noqa: PLC0415

    assert "recipe" in bench_fcn.DEFAULT_CASES.split(",")
    cfg = TrainConfig()
    runner = bench_fcn.MinifcnRunner("recipe")
    side = training_crop(cfg) or cfg.image_size  # what a training step sees
    assert runner.x.shape == (cfg.batch_size, 3, side, side)
    assert runner.model.num_classes == 6 and runner.model.width == cfg.width
    assert runner.model.learn_upsampling == cfg.learn_upsampling and runner.model.upscore2.weight.trainable
    assert all(m.p == cfg.dropout for _, m in runner.model.named_modules() if type(m).__name__ == "Dropout")
    assert runner.loss.reduction == cfg.reduction and runner.loss.class_weight is None
    opt = runner.opt
    assert (opt.lr, opt.momentum, opt.weight_decay) == (cfg.lr, cfg.momentum, cfg.weight_decay)
    assert int(runner.labels.max()) < 6


def test_bench_shifted_conv_routes_agree_with_the_textbook_route():
    """The script raises if a shifted route differs from the textbook one (bands of 100 KiB: a ragged last band)."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_shifted_conv.py"), "--layers", "conv1_2,conv2_1",
                           "--band-kib", "100,0", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("conv")]
    assert len(rows) == 2 * 3 * 3 and all(float(r[-2]) > 0 for r in rows)  # 2 layers x 3 passes x 3 routes


@pytest.mark.slow  # six training processes (four before --also): 107 s for four on the 2-core machine at load 8, most of it process start-up
def test_bench_under_load_times_both_settings_in_both_conditions():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_under_load.py"), "--steps", "2", "--rounds", "1",
                           "--image-size", "16", "--also", "16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()
            if line.startswith(("sleep ", "spin ", "timeout=")) and not line.split()[0].endswith(",")}  # the table
    assert set(rows) == {"sleep", "spin", "timeout=16"}
    for r in rows.values():  # alone s, beside busy s, their ratio (of the unrounded figures)
        alone, busy, ratio = float(r[1]), float(r[2]), float(r[3])
        assert alone > 0 and busy > 0 and ratio == pytest.approx(busy / alone, rel=0.05)


@pytest.mark.slow  # four training processes
def test_bench_under_load_times_an_older_commit_against_the_working_tree():
    """--before REV: the rows are the package at REV (extracted with git archive, run from there) and the
    working tree; --also does not go with it."""
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_under_load.py"), "--steps", "2", "--rounds", "1",
                           "--image-size", "16", "--before", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAD, alone:" in proc.stdout and "working tree, beside a busy process:" in proc.stdout
    table = [line.split() for line in proc.stdout.splitlines() if line.startswith(("HEAD ", "working tree "))]
    assert [r[0] for r in table] == ["HEAD", "working"] and all(float(r[-3]) > 0 for r in table)
    refused = subprocess.run([sys.executable, os.path.join(BENCH, "bench_under_load.py"), "--before", "HEAD",
                              "--also", "16"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--before compares two versions" in refused.stderr


@pytest.mark.slow  # 10 s on a quiet 2-core machine, 15 to 27 s on a contended one (PyTorch's two-thread ops stall)
def test_bench_layers_quick_prints_table():
    proc = _run("--quick")
    assert proc.returncode == 0, proc.stderr
    _check_table(proc.stdout, with_torch=importlib.util.find_spec("torch") is not None)
    assert "WARNING" not in proc.stderr, proc.stderr  # minifcn and PyTorch agree where both ran


def test_bench_layers_only_selects_rows():
    proc = _run("--quick", "--only", "upscore2,pool4", "--no-torch", "--markdown", "--repeats", "1")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r.split("|")[1].strip() for r in rows] == ["upscore2", "pool4"]
    assert "torch ms" not in proc.stdout


def test_bench_layers_only_unknown_name_fails():
    proc = _run("--quick", "--only", "no_such_layer")
    assert proc.returncode != 0
    assert "matches no row" in proc.stderr


def test_flop_counts():
    # VGG16 conv1_2 at 224: 2 * 64 * 224 * 224 * 64 * 9 = 3.70 GFLOP.
    assert common.conv_flops(1, 64, 64, 224, 224, 3, 3) == 3_699_376_128
    # FCN-32s upscore (k64 s32) on a 16 x 16 input: every input pixel scatters a 21 x 64 x 64 patch.
    assert common.conv_transpose_flops(1, 21, 21, 16, 16, 64, 64) == 2 * 21 * 16 * 16 * 21 * 64 * 64
    # A transposed convolution 5 -> 3 on a 7 x 7 input costs what the convolution 3 -> 5 with a 7 x 7 output costs.
    assert common.conv_transpose_flops(2, 5, 3, 7, 7, 4, 4) == common.conv_flops(2, 3, 5, 7, 7, 4, 4)


def test_interleaved_returns_per_call_times():
    calls = []
    t = common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                           rounds=3, warmup=1)
    assert set(t) == {"a", "b"}
    assert calls == ["a", "b"] * 4  # warm-up round, then 3 rounds, alternating
    assert len(t["a"].samples) == 3 and t["a"].min <= t["a"].median


def test_format_table_aligns_columns():
    text = common.format_table(["name", "ms"], [["conv", 1.5], ["upscore32", 123.25]], [None, ".2f"])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[2].endswith("  1.50") and lines[3].endswith("123.25")
    md = common.format_table(["name", "ms"], [["conv", None]], markdown=True)
    assert md.splitlines()[1] == "|------|---:|" and md.splitlines()[2] == "| conv |  - |"


def test_machine_line_and_peak_rss():
    line = common.machine_line()
    assert "cores" in line and "NumPy" in line
    assert common.peak_rss_mb() > 0


def test_cpu_model_names_the_family_and_model(tmp_path):
    """A VM's "AMD EPYC" is one of several processors: the line carries its family and model numbers."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\nmodel\t\t: 49\n"
                    "model name\t: AMD EPYC\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 1\n")
    assert common.cpu_model(str(info)) == "AMD EPYC (family 23 model 49)"
    info.write_text("processor\t: 0\nmodel name\t: Apple M2\n")
    assert common.cpu_model(str(info)) == "Apple M2"


def test_import_torch_quiets_pytorchs_idle_threads_unless_told(monkeypatch):
    """PyTorch's idle OpenMP threads spin less (GOMP_SPINCOUNT) in the benchmarks, unless the caller set it."""
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(common, "_torch_checked", False)
    common.import_torch()
    assert os.environ["GOMP_SPINCOUNT"] == common.TORCH_SPINCOUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    monkeypatch.setattr(common, "_torch_checked", False)
    torch = common.import_torch()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
    if torch is not None:
        assert "GOMP_SPINCOUNT=300000" in common.machine_line(torch)


def test_machine_line_names_forced_openblas_choices(monkeypatch):
    """A machine that forces OpenBLAS's kernels (OPENBLAS_CORETYPE) has another ceiling: the line says so."""
    for var in common.OPENBLAS_CHOICES:
        monkeypatch.delenv(var, raising=False)
    assert "forced by" not in common.machine_line()
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "512")
    assert "forced by OPENBLAS_CORETYPE=Haswell OPENBLAS_L2_SIZE=512," in common.machine_line()
    kernels = common.blas_info()["kernels"]
    if common.blas_info()["name"].endswith("openblas"):  # the loaded OpenBLAS names the kernels it runs
        assert kernels and kernels in common.machine_line()


def test_bench_before_after_compares_a_commit_with_the_working_tree():
    if subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_before_after.py"), "--before", "HEAD",
                           "--rounds", "2", "--batch-size", "2", "--image-size", "32"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    assert "(batch 2 x 32^2, width 0.125), 2 interleaved rounds" in line and "before (HEAD)" in line, line  # whole
    assert float(line.rsplit(" ", 1)[-1]) > 0


def test_bench_saved_input_quick_prints_its_table():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_saved_input.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("machine: ") and "21 saved inputs" in proc.stdout
    for row in ("training step, inputs checked", "training step, unchecked", "SavedInput + check, all inputs",
                "full sums, forward and backward"):
        assert row in proc.stdout


def test_bench_step_sizes_prints_one_row_per_case():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_step_sizes.py"), "--sides", "48,32",
                           "--batches", "1,2", "--rounds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if " x " in line and line.split()[0].isdigit()]
    assert [" ".join(r[:3]) for r in rows] == ["1 x 48^2", "1 x 32^2", "2 x 48^2", "2 x 32^2"]
    assert float(rows[0][-1]) == 1.0 and all(float(r[3]) > 0 for r in rows)


def test_bench_before_after_gives_both_versions_the_same_crop():
    """The crop comes from the caller (the working tree's training_crop), never from each package's default."""
    import bench_before_after  # noqa: PLC0415

    step = bench_before_after.training_step("minifcn", 1, 48, crop_size=24, batches=2)
    assert all(x.shape[2:] == (24, 24) for x, _ in step.batches)
    whole = bench_before_after.training_step("minifcn", 1, 48, crop_size=None, batches=2, width=0.0625)
    assert all(x.shape[2:] == (48, 48) for x, _ in whole.batches)
    assert whole.model.conv1_1.out_channels == 4  # 64 * 0.0625: the width asked for


def test_bench_before_after_steps_follow_the_warm_up_and_stop_at_a_non_finite_loss():
    """The benchmark's steps take the recipe's warm-up (the full rate from the first step could drive the model
    to NaN, and NaN maps have no repeated lines to cut), and a NaN loss stops it."""
    import bench_before_after  # noqa: PLC0415
    from minifcn.train import TrainConfig  # noqa: PLC0415

    cfg = TrainConfig()
    step = bench_before_after.training_step("minifcn", 1, 48, crop_size=24, batches=2, width=0.0625)
    step(0)
    assert step.optimizer.lr == pytest.approx(cfg.lr / cfg.warmup, rel=1e-3)  # and the poly decay, barely begun
    step(1)
    assert step.optimizer.lr == pytest.approx(2 * cfg.lr / cfg.warmup, rel=1e-3)
    step.model.conv1_1.weight.data[...] = np.nan
    with pytest.raises(FloatingPointError, match="diverged"):
        step(2)


def test_bench_barrier_times_each_barrier():
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "bench_barrier.py"), "--waits", "50", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("multiprocessing.", "RankBarrier"))]
    assert len(rows) == 3 and all(float(line.split()[-1]) > 0 for line in rows), proc.stdout
