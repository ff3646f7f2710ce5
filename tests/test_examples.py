"""Every script in examples/ runs with --quick, writes a PNG that Pillow opens, and its printed claims hold.

Each example runs in a subprocess (as a user would run it, from the repository
root, without installing anything) and writes into tmp_path.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name, *args, timeout=300, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MINIFCN_DEVICE="cpu")
    result = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{name} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def assert_png(path: Path, max_bytes=200_000):
    assert path.is_file(), f"{path} was not written"
    assert path.stat().st_size < max_bytes, f"{path} is {path.stat().st_size} bytes"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= 100 and im.height >= 100


def number_after(text, prefix):
    """The first number printed after ``prefix`` on a line."""
    m = re.search(re.escape(prefix) + r"\s*([-+0-9.eE]+|nan|inf)", text)
    assert m, f"{prefix!r} not in output:\n{text}"
    return float(m.group(1))


def test_every_example_is_tested():
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == {"transposed_conv_backprop.py", "gradcheck_layers.py", "train_fcn_shapes.py",
                       "upsampling_compare.py", "fcn_stages.py", "staged_training.py"}


SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_examples_write_only_under_runs_examples(name, tmp_path):
    """With its default folders, an example writes under runs/examples/ of the working directory and nowhere
    else: never into runs/shapes-fcn8s, the run folder of the README's main command (a fake one is planted)."""
    main_run = tmp_path / "runs" / "shapes-fcn8s"
    main_run.mkdir(parents=True)
    (main_run / "best.npz").write_bytes(b"the README's trained model")
    before = {p for p in tmp_path.rglob("*")}
    run_example(name, cwd=tmp_path)
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert written, f"{name} wrote nothing"
    outside = [str(p.relative_to(tmp_path)) for p in written if not p.is_relative_to(tmp_path / "runs" / "examples")]
    assert not outside, f"{name} wrote outside runs/examples/: {outside}"
    assert (main_run / "best.npz").read_bytes() == b"the README's trained model"
    assert sorted(os.listdir(main_run)) == ["best.npz"]


def test_transposed_conv_backprop(tmp_path):
    out = run_example("transposed_conv_backprop.py", "--out", str(tmp_path))
    assert number_after(out, "largest error over all geometries:") < 1e-12
    assert "interior values of a constant image [1.0, 2.0, 4.0]" in out.split("all-ones kernel 3, stride 2:")[-1]
    assert "all-ones kernel 4, stride 2: interior values of a constant image [4.0]" in out
    assert "1234" in out and "output_padding=(1, 1)" in out
    for name in ("transposed_conv.png", "checkerboard.png"):
        assert_png(tmp_path / name)


def test_gradcheck_layers(tmp_path):
    out = run_example("gradcheck_layers.py", "--out", str(tmp_path))
    assert "all passed" in out
    assert re.search(r"caught: Conv1x1Wrong input FAIL, max relative error [0-9.]+ at index \(\d+, \d+, \d+, \d+\)", out)
    assert "Conv1x1Wrong: gradient check" in out and out.count("FAIL") >= 2   # the table row and the summary
    assert_png(tmp_path / "gradcheck.png")


def test_upsampling_compare(tmp_path):
    out = run_example("upsampling_compare.py", "--out", str(tmp_path))
    assert number_after(out, "max |difference|") < 1e-12                      # inside the frame
    bilinear = number_after(out, "held-out MSE inside the frame, bilinear ConvTranspose2d:")
    learned = number_after(out, "held-out MSE inside the frame, learned ConvTranspose2d:")
    assert number_after(out, "held-out MSE inside the frame, bilinear:") == pytest.approx(bilinear)
    assert learned < bilinear
    assert_png(tmp_path / "upsampling.png")


def test_train_fcn_shapes(tmp_path):
    run = tmp_path / "run"
    out = run_example("train_fcn_shapes.py", "--out", str(run))
    loss = number_after(out, "final train loss")
    assert math.isfinite(loss) and loss > 0
    assert 0.0 <= number_after(out, "pixel accuracy") <= 1.0
    assert "best.npz: FCN8s" in out
    for name in ("predictions.png", "loss.png"):
        assert_png(run / name)
    assert (run / "best.npz").is_file() and (run / "metrics.jsonl").is_file()


@pytest.mark.parametrize("name,folder_option", [("train_fcn_shapes.py", "--out"), ("staged_training.py", "--out"),
                                                ("fcn_stages.py", "--run-dir")])
def test_examples_run_again_only_with_overwrite(name, folder_option, tmp_path):
    """A second run into the same folder is refused (the first run's files are kept) and names --overwrite,
    which the example itself accepts."""
    args = [folder_option, str(tmp_path / "run")] + (["--out", str(tmp_path)] if name == "fcn_stages.py" else [])
    run_example(name, *args)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MINIFCN_DEVICE="cpu")
    again = subprocess.run([sys.executable, str(EXAMPLES / name), "--quick", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr, again.stderr[-2000:]
    run_example(name, *args, "--overwrite")


def test_fcn_stages(tmp_path):
    out = run_example("fcn_stages.py", "--out", str(tmp_path), "--run-dir", str(tmp_path / "run"))
    assert "trained in" in out
    assert number_after(out, "equals model(x): max |difference|") == 0.0
    assert number_after(out, "+ C (stride 8): max relative difference") < 1e-4
    for stage in ("32s", "16s", "8s"):
        acc = float(re.search(rf"stage {stage} \(\w+\): pixel accuracy ([0-9.]+)", out).group(1))
        assert 0.0 <= acc <= 1.0
    assert_png(tmp_path / "fcn_stages.png")
    assert (tmp_path / "run" / "best.npz").is_file()


def test_fcn_stages_from_checkpoint(tmp_path):
    """--checkpoint of an FCN-8s skips training: reuse the run that train_fcn_shapes.py --quick writes."""
    run = tmp_path / "run"
    run_example("train_fcn_shapes.py", "--out", str(run))
    out = run_example("fcn_stages.py", "--out", str(tmp_path), "--checkpoint", str(run / "best.npz"))
    assert "trained in" not in out
    assert number_after(out, "equals model(x): max |difference|") == 0.0
    assert_png(tmp_path / "fcn_stages.png")


def test_staged_training(tmp_path):
    """32s, then 16s --init-from it, then 8s --init-from that; the figure titles each model with the mean IU
    its own run recorded; --from-runs redraws without training."""
    out = run_example("staged_training.py", "--out", str(tmp_path))
    assert "init from" in out and "copied 32 parameters" in out and "copied 35 parameters" in out
    for model in ("fcn32s", "fcn16s", "fcn8s"):
        assert (tmp_path / model / "best.npz").is_file()
        measured = json.loads((tmp_path / model / "metrics.jsonl").read_text().splitlines()[0])["mean_iu"]
        assert number_after(out, f"{model}: mean IU") == pytest.approx(measured, abs=1e-4)
    assert_png(tmp_path / "staged_refinement.png")
    again = run_example("staged_training.py", "--out", str(tmp_path), "--from-runs")
    assert "trained in" not in again and "wrote" in again


def test_figure_titles_never_overlap():
    """fcn_stages.py's titles over 128-px tiles (the README's image size): each title is wrapped to its
    column, so the middle of every gap between two columns stays white through the title band."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import _figure as fig  # noqa: PLC0415
    finally:
        sys.path.remove(str(EXAMPLES))
    from PIL import ImageDraw  # noqa: PLC0415

    titles = [["input", "ground truth", "32s = A", "16s = A + B", "8s = A + B + C (output)"],
              ["", "", "A: from score_fr (stride 32)", "B: from pool4 (stride 16)", "C: from pool3 (stride 8)"]]
    for line in fig.wrap(titles[1][2], 100).split("\n"):
        assert ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(line, font=fig.font(13)) <= 100
    tile = Image.new("RGB", (128, 128), (0, 0, 0))
    pad = 8
    pixels = np.asarray(fig.compose([[tile] * 5, [None, None, tile, tile, tile]], titles=titles, title_h=20, pad=pad))
    for c in range(1, 5):  # tiles never reach into a gap: only a title can
        gap_middle = pad + c * (128 + pad) - pad // 2
        assert (pixels[:, gap_middle] == 255).all(), f"a title crosses the gap before column {c}"
