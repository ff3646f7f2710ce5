"""The command line (minifcn/cli.py): train, eval, predict, gradcheck, and errors."""
from __future__ import annotations

import argparse
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
              "--val-images", "2", "--batch-size", "2", "--ranks", "1", "--epochs", "1", "--dropout", "0", "--no-progress",
              "--device", "cpu", "--seed", "1", "--warmup", "5", "--poly-power", "2"]


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
    assert (cfg["warmup"], cfg["poly_power"]) == (5, 2.0)
    # 2 steps; the second (t = 1) used lr * (1 - 1/2) ** 2 (poly, power 2) * 2/5 (warm-up)
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert row["lr"] == pytest.approx(cfg["lr"] * 0.25 * 0.4, rel=1e-12)


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


def _expected_prediction(out, image):
    from minifcn.data import IMAGENET_MEAN_RGB, to_tensor  # noqa: PLC0415
    from minifcn.train import TrainConfig, load_model, predict_labels  # noqa: PLC0415

    model, meta = load_model(out / "checkpoint.npz")
    model.eval()
    cfg = TrainConfig.from_dict(meta["config"])
    return predict_labels(model, to_tensor(image, mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale)[None])[0], meta


@pytest.fixture
def photo(tmp_path):
    """A 29 x 37 image with a red square, saved as photo.jpg.png."""
    image = np.random.default_rng(0).integers(0, 256, (29, 37, 3), dtype=np.uint8)
    image[5:20, 5:20] = (220, 30, 30)
    path = tmp_path / "photo.jpg.png"
    Image.fromarray(image).save(path)
    return image, path


def test_predict_writes_image_prediction_overlay_and_legend(run, tmp_path, photo, capsys):
    """Any image size (here 37 x 29): three panels, image | prediction | overlay, the prediction tile is
    the checkpoint's prediction in the label colours, and the legend shows every class's colour."""
    from minifcn.viz import _tile_size, colorize, voc_palette  # noqa: PLC0415

    out, _ = run
    image, path = photo
    dest = tmp_path / "predictions"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(path), "--out", str(dest)]) == 0
    target = dest / "photo.jpg_prediction.png"
    assert str(target) in capsys.readouterr().out
    with Image.open(target) as im:
        written = np.asarray(im.convert("RGB"))
    pred, meta = _expected_prediction(out, image)
    h, w = _tile_size(29, 37, None)
    pad, header = 8, 24  # prediction_grid's layout
    assert written.shape[1] == pad + 3 * (w + pad)
    x0 = pad + (w + pad)
    tile = written[header:header + h, x0:x0 + w]
    expected = np.asarray(Image.fromarray(colorize(pred)).resize((w, h), Image.NEAREST))
    np.testing.assert_array_equal(tile, expected)
    legend = written[header + h + pad:].reshape(-1, 3)
    for c in range(meta["num_classes"]):  # every class's swatch, present in the prediction or not
        assert (legend == voc_palette()[c]).all(axis=1).any(), f"no swatch of class {c} in the legend"


def test_predict_overlay_only(run, tmp_path, photo):
    from minifcn.viz import overlay  # noqa: PLC0415

    out, _ = run
    image, path = photo
    dest = tmp_path / "overlays"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(path), "--out", str(dest),
                 "--overlay-only"]) == 0
    assert os.listdir(dest) == ["photo.jpg_overlay.png"]
    with Image.open(dest / "photo.jpg_overlay.png") as im:
        written = np.asarray(im.convert("RGB"))
    np.testing.assert_array_equal(written, overlay(image, _expected_prediction(out, image)[0]))


def test_predict_never_overwrites_an_output_of_the_same_call(run, tmp_path, capsys):
    """a/img.png and b/img.png (and a/img.png given twice) each get their own output."""
    out, _ = run
    paths = []
    for k, folder in enumerate(("a", "b", "a")):
        (tmp_path / folder).mkdir(exist_ok=True)
        path = tmp_path / folder / "img.png"
        if not path.exists():
            Image.fromarray(np.full((20, 24, 3), 60 * k, np.uint8)).save(path)
        paths.append(str(path))
    dest = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), *paths, "--out", str(dest),
                 "--overlay-only"]) == 0
    assert sorted(os.listdir(dest)) == ["img-2_overlay.png", "img-3_overlay.png", "img_overlay.png"]
    printed = capsys.readouterr().out
    for path, name in zip(paths, ("img_overlay.png", "img-2_overlay.png", "img-3_overlay.png")):
        assert f"{path} -> {dest / name}" in printed
    with Image.open(dest / "img-2_overlay.png") as im:  # b/img.png's, not a copy of a's
        assert np.asarray(im)[0, 0].tolist() == [60, 60, 60]


class _RankOfTwo:
    """A stand-in communicator: rank ``rank`` of 2, rank 1's lines as given (for gather_objects)."""

    size, local_rank, local_size = 2, 0, 1

    def __init__(self, rank, others=()):
        self.rank, self.others, self.gathered = rank, list(others), None

    def bind_device(self, device):
        pass

    def gather_objects(self, value):
        self.gathered = value
        return [value, self.others] if self.rank == 0 else None


@pytest.mark.parametrize("rank", [0, 1])
def test_predict_under_mpi_each_rank_writes_its_share_and_rank_0_prints_all(run, tmp_path, capsys, monkeypatch,
                                                                           rank):
    """Rank r of 2 predicts inputs r, r + 2, ... (and writes only theirs); rank 0 prints every rank's lines
    in input order, the others print nothing."""
    import minifcn.cli as cli  # noqa: PLC0415

    out, _ = run
    paths = []
    for k in range(5):
        path = tmp_path / f"in{k}.png"
        Image.fromarray(np.full((20, 24, 3), 40 * k, np.uint8)).save(path)
        paths.append(str(path))
    comm = _RankOfTwo(rank, others=[(3, "rank 1: in3"), (1, "rank 1: in1")])
    monkeypatch.setattr(cli, "world", lambda: comm)
    dest = tmp_path / "p"
    assert main(["predict", "--checkpoint", str(out / "checkpoint.npz"), *paths, "--out", str(dest),
                 "--overlay-only"]) == 0
    mine = [k for k in range(5) if k % 2 == rank]
    assert sorted(os.listdir(dest)) == [f"in{k}_overlay.png" for k in mine]
    assert [i for i, _ in comm.gathered] == mine
    printed = capsys.readouterr().out.splitlines()
    if rank == 1:
        assert printed == []
    else:
        assert [line.split(" ->")[0].split(": ")[-1] for line in printed] == [
            paths[0], "in1", paths[2], "in3", paths[4]]


def test_predict_checks_every_input_first(run, tmp_path, photo, capsys):
    """An unreadable file and a missing one among good ones: exit 2, each bad file named, nothing written
    (not even the output folder)."""
    out, _ = run
    _, good = photo
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    missing = tmp_path / "missing.png"
    dest = tmp_path / "never"
    code = main(["predict", "--checkpoint", str(out / "checkpoint.npz"), str(broken), str(good), str(missing),
                 "--out", str(dest)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(broken) in err and str(missing) in err and "2 of 3 images" in err
    assert not dest.exists()


def _all_parsers():
    """(name, parser) of the top level and every subcommand, explain's topics included."""
    from minifcn.cli import build_parser  # noqa: PLC0415

    found, todo = [], [("minifcn", build_parser())]
    while todo:
        name, parser = todo.pop()
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += [(f"{name} {k}", p) for k, p in action.choices.items()]
    return found


@pytest.mark.parametrize("name,parser", _all_parsers(), ids=[n for n, _ in _all_parsers()])
def test_help_shows_every_default(name, parser):
    """Every option of every subcommand has help text that states its default, once; none reads '(default: None)'."""
    text = parser.format_help()
    assert "(default: None)" not in text and "``" not in text
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{name} {action.option_strings[0]} has no help text"
        line = (formatter._get_help_string(action) or "").replace("%(default)s", str(action.default))
        if action.required:
            continue
        assert line.count("default:") == 1, f"{name} {action.option_strings[0]}: {line!r}"
        if action.default not in (None, False, argparse.SUPPRESS):
            assert f"(default: {action.default})" in line, line


def test_top_level_help_names_every_subcommand():
    from minifcn.cli import build_parser  # noqa: PLC0415

    text = build_parser().format_help()
    for command in ("train", "eval", "predict", "gradcheck", "explain"):
        assert command in text.split("positional arguments")[0], command  # in the description, too


def test_explain_fcn_size_is_the_image_and_width_the_channels(capsys):
    assert main(["explain", "fcn", "--model", "fcn32s", "--size", "64x80", "--width", "0.0625"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "64 x 80 input" in head and "width 0.0625" in head
    with pytest.raises(SystemExit):
        main(["explain", "fcn", "--size", "64x80x3"])
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


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


_RECORD_ENV_WHEN_NUMPY_LOADS = """
import importlib.abc, os, sys
seen = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not seen:
            seen.append(os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
        return None
sys.meta_path.insert(0, Spy())
import minifcn.cli
print(seen[0])
"""


@pytest.mark.parametrize("preset, expected", [(None, "4"), ("9", "9")])
def test_openblas_thread_timeout_is_set_before_numpy_loads(preset, expected):
    """Both entry points import the package, which sets OPENBLAS_THREAD_TIMEOUT (idle BLAS threads sleep
    instead of spinning) before NumPy, the only moment OpenBLAS reads it; a user's own value wins."""
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    result = subprocess.run([sys.executable, "-c", _RECORD_ENV_WHEN_NUMPY_LOADS], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


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
    # SIGINT back to its default in the child: a test run started in the background of a non-interactive
    # shell (`pytest &`) ignores SIGINT, Python then keeps it ignored, and the training would finish its
    # 200 epochs and exit 0 instead of stopping
    proc = subprocess.Popen([sys.executable, "-m", "minifcn", "train", *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=cli_env(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
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
