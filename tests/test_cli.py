"""The command line (minifcn/cli.py): train, eval, predict, gradcheck, and errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minifcn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY_TRAIN = ["--model", "fcn8s", "--width", "0.03125", "--image-size", "16", "--train-images", "4",
              "--val-images", "2", "--batch-size", "2", "--epochs", "1", "--dropout", "0", "--no-progress",
              "--device", "cpu", "--seed", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny FCN-8s training through the CLI; the run folder is shared by the tests below."""
    out = tmp_path_factory.mktemp("cli") / "run"
    return out, main(["train", *TINY_TRAIN, "--out", str(out)])


def test_train_writes_the_run_folder(run):
    out, code = run
    assert code == 0
    assert {"metrics.jsonl", "checkpoint.npz", "best.npz", "loss.png", "predictions.png"} <= set(os.listdir(out))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["epoch"] == 1 and np.isfinite(row["train_loss"])


def test_train_options_reach_the_config(run):
    from minifcn.checkpoint import load_checkpoint  # noqa: PLC0415

    out, _ = run
    _, meta = load_checkpoint(out / "checkpoint.npz")
    cfg = meta["config"]
    assert (cfg["model"], cfg["width"], cfg["image_size"], cfg["train_images"], cfg["batch_size"], cfg["dropout"],
            cfg["seed"], cfg["progress"]) == ("fcn8s", 0.03125, 16, 4, 2, 0.0, 1, False)


def test_eval_json(run, capsys):
    out, _ = run
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--json"]) == 0
    stdout = capsys.readouterr().out
    scores = json.loads(stdout)
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"):
        assert 0.0 <= scores[key] <= 1.0, key
    # the same val split the training scored at the end of its epoch
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert scores["pixel_acc"] == pytest.approx(last["pixel_acc"], abs=1e-6)
    # strict JSON (no NaN tokens: classes absent from the val images are null)
    json.loads(stdout, parse_constant=lambda token: pytest.fail(f"non-standard JSON token {token}"))


def test_eval_text(run, capsys):
    out, _ = run
    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz")]) == 0
    text = capsys.readouterr().out
    assert "mean IU" in text and "background" in text


def test_predict_writes_an_overlay(run, tmp_path, capsys):
    """Any image size (here 37 x 29): the overlay has the image's size and equals the overlay
    of the checkpoint's prediction."""
    from minifcn.data import IMAGENET_MEAN_RGB, to_tensor  # noqa: PLC0415
    from minifcn.train import TrainConfig, load_model, predict_labels  # noqa: PLC0415
    from minifcn.viz import overlay  # noqa: PLC0415

    out, _ = run
    image = np.random.default_rng(0).integers(0, 256, (29, 37, 3), dtype=np.uint8)
    image[5:20, 5:20] = (220, 30, 30)
    path = tmp_path / "photo.jpg.png"
    Image.fromarray(image).save(path)
    dest = tmp_path / "overlays"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(path), "--out", str(dest)]) == 0
    target = dest / "photo.jpg_overlay.png"
    assert str(target) in capsys.readouterr().out
    with Image.open(target) as im:
        written = np.asarray(im.convert("RGB"))
    assert written.shape == (29, 37, 3)
    model, meta = load_model(out / "checkpoint.npz")
    model.eval()
    cfg = TrainConfig.from_dict(meta["config"])
    x = to_tensor(image, mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale)[None]
    np.testing.assert_array_equal(written, overlay(image, predict_labels(model, x)[0]))


def test_gradcheck_passes(capsys):
    assert main(["gradcheck"]) == 0
    text = capsys.readouterr().out
    assert "passed" in text and " 0 failed" in text
    for layer in ("Conv2d", "ConvTranspose2d", "MaxPool2d", "Crop", "SoftmaxCrossEntropy"):
        assert layer in text
    rows = [line for line in text.splitlines() if line.rstrip().endswith((" ok", " FAIL"))]
    assert len(rows) > 20 and all(r.rstrip().endswith(" ok") for r in rows)


def test_gradcheck_fails_on_a_broken_layer(monkeypatch, capsys):
    """The command can fail: a ReLU whose backward ignores the mask is caught (exit 1)."""
    from minifcn.layers import ReLU  # noqa: PLC0415

    monkeypatch.setattr(ReLU, "backward", lambda self, dy: dy)
    assert main(["gradcheck", "--mode", "random"]) == 1
    text = capsys.readouterr().out
    assert "FAIL" in text and " 0 failed" not in text


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04 truncated"])
def test_corrupt_checkpoint_gives_exit_2_and_one_line(tmp_path, capsys, content):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(content)
    for command in (["eval", "--checkpoint", str(bad)], ["predict", "--checkpoint", str(bad), str(bad)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ") and str(bad) in err


def test_missing_checkpoint_and_missing_dataset(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "absent.npz")]) == 2
    err = capsys.readouterr().err
    assert "absent.npz" in err and "does not exist" in err
    assert main(["train", *TINY_TRAIN, "--dataset", "folder", "--data-dir", str(tmp_path / "nodata"),
                 "--out", str(tmp_path / "out")]) == 2
    assert "nodata" in capsys.readouterr().err


def test_divergence_gives_exit_3(tmp_path, capsys):
    args = ["train", "--model", "encoder-decoder", "--width", "0.0625", "--image-size", "32", "--train-images", "8",
            "--val-images", "2", "--batch-size", "4", "--epochs", "3", "--lr", "1e6", "--no-progress",
            "--out", str(tmp_path / "run")]
    with np.errstate(all="ignore"):
        assert main(args) == 3
    err = capsys.readouterr().err
    assert "training diverged" in err and "lr=1000000.0" in err


def test_python_m_minifcn_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "minifcn", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    for command in ("train", "eval", "predict", "gradcheck"):
        assert command in result.stdout
    result = subprocess.run([sys.executable, "-m", "minifcn", "train", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0 and "--reduction" in result.stdout and "--learn-upsampling" in result.stdout


# -- issue 14: nothing lost, nothing silently wrong ----------------------------------------------

def cli_env():
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_ctrl_c_stops_with_one_line_and_exit_130(tmp_path):
    """A real SIGINT to a training in another process (band threads running): one line on stderr
    naming the last checkpoint and --resume, exit status 130, no traceback."""
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    out = tmp_path / "run"
    args = list(TINY_TRAIN)
    args[args.index("--epochs") + 1] = "200"
    proc = subprocess.Popen([sys.executable, "-m", "minifcn", "train", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.npz").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch's steps
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("interrupted: the last checkpoint is ") and str(out / "checkpoint.npz") in lines[0]
    assert "--resume" in lines[0] and "Traceback" not in err


def test_eval_and_predict_refuse_a_checkpoint_with_nonfinite_weights(run, tmp_path, capsys):
    from minifcn.checkpoint import load_checkpoint, save_checkpoint  # noqa: PLC0415

    out, _ = run
    arrays, meta = load_checkpoint(out / "checkpoint.npz")
    arrays["model.conv3_1.bias"] = np.full_like(arrays["model.conv3_1.bias"], np.nan)
    bad = tmp_path / "diverged.npz"
    save_checkpoint(bad, arrays, meta)
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    for command in (["eval", "--checkpoint", str(bad)],
                    ["predict", "--checkpoint", str(bad), str(image), "--out", str(tmp_path / "p")]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "'conv3_1.bias'" in err and "NaN" in err, err


def test_eval_refuses_a_dataset_with_another_number_of_classes(run, tmp_path, capsys):
    """The run's checkpoint predicts the 6 shapes classes; a 3-class folder dataset is refused."""
    out, _ = run
    root = tmp_path / "data" / "val"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16) % 3).save(root / "masks" / "a.png")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz"), "--dataset", "folder",
                 "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert "predicts 6 classes (background, " in err and "has 3" in err


@pytest.mark.parametrize("argv, says", [
    (["train", "--seed", "-1"], "seed (--seed) must be a non-negative integer, got -1"),
    (["train", "--input-scale", "nan"], "input_scale (--input-scale) must be a finite number > 0, got nan"),
    (["train", "--epochs", "-1"], "epochs (--epochs) must be a positive integer, got -1"),
    (["explain", "sizes", "--stride", "0"], "explain sizes: --stride must be an integer >= 1, got 0"),
    (["explain", "conv-matrix", "--kernel", "0"], "explain conv-matrix: --kernel must be an integer >= 1, got 0"),
])
def test_bad_options_get_one_line_naming_the_option(tmp_path, capsys, argv, says):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and says in err, err
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_gets_one_clear_line(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("x")
    assert main(["train", *TINY_TRAIN, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a folder" in err and "Errno" not in err


def test_train_twice_into_one_folder_needs_resume_or_overwrite(run, capsys):
    out, _ = run
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["train", *TINY_TRAIN, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--overwrite" in err and "--resume" in err
    assert (out / "metrics.jsonl").read_bytes() == before


def test_ctrl_c_in_eval_is_one_line_and_exit_130(run, capsys, monkeypatch):
    import minifcn.train as train_module  # noqa: PLC0415

    out, _ = run

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate", interrupted)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(out / "checkpoint.npz")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted: minifcn eval stopped"
