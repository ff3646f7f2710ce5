"""Every command in the README's ```bash blocks runs, in README order, in a fresh folder, in a quick form.

The quick form of a command is the command as printed with options appended
(argparse lets a later option win): `minifcn train` gets a tiny model and a few
32 x 32 images, an example gets `--quick`. So an option the README names that
the code lacks, or a path one command writes and the next reads, fails here.
Installation lines (venv, pip) are not run; the test command must be .ci/run's;
the commands the README marks as needing data or a GPU that CI lacks are the
only ones skipped, and they are listed here by name.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minifcn.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```bash[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
QUICK_TRAIN = ["--width", "0.03125", "--image-size", "32", "--train-images", "4", "--val-images", "2",
               "--batch-size", "2", "--epochs", "1", "--no-progress", "--device", "cpu"]
NEEDS_WHAT_CI_LACKS = ("--dataset voc", "MINIFCN_DEVICE=gpu")
TEST_COMMAND = "pip install -e '.[test]' && python -m pytest -q"


def readme_commands():
    """Each shell command of the README's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in FENCE.findall(README.read_text(encoding="utf-8")):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(re.sub(r"\s+", " ", line))
    return commands


def fake_inputs(cwd: Path):
    """What the README's commands take from the user: a photo, and a folder dataset in my_data/."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(cwd / "photo.png")
    for split, count in (("train", 4), ("val", 2)):
        (cwd / "my_data" / split / "images").mkdir(parents=True)
        (cwd / "my_data" / split / "masks").mkdir(parents=True)
        for k in range(count):
            mask = np.zeros((32, 32), np.uint8)
            mask[4 + k:20 + k, 6:22] = 1 + k % 2
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                cwd / "my_data" / split / "images" / f"{k}.png")
            Image.fromarray(mask, mode="L").save(cwd / "my_data" / split / "masks" / f"{k}.png")


def run_quick(command: str, cwd: Path):
    """Run one README command in its quick form; returns a note of what was run."""
    if command.startswith("python3 -m venv"):
        return "not run: creates the environment this test runs in"
    if command == TEST_COMMAND:
        return "not run: it is the command running this test"
    notes = []
    for part in command.split("&&"):
        argv = shlex.split(part)
        if argv[:2] == ["pip", "install"]:
            notes.append("not run: install")
        elif argv[0] == "minifcn":
            extra = QUICK_TRAIN if argv[1] == "train" else []
            if argv[1] == "train" and "--resume" in argv:
                extra = QUICK_TRAIN + ["--epochs", "2"]  # one more epoch than the run it continues
            code = main(argv[1:] + extra)
            assert code == 0, f"README command {command!r} exited {code} in its quick form"
            notes.append("ran")
        elif argv[0] == "python" and argv[1].startswith("examples/"):
            env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                       MINIFCN_DEVICE="cpu")
            result = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--quick"], cwd=cwd, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{command!r}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
            notes.append("ran")
        else:
            raise AssertionError(f"README command {command!r}: this test does not know how to run {argv[0]!r}")
    return ", ".join(notes)


def test_the_readme_test_command_is_the_ci_command():
    assert TEST_COMMAND in readme_commands()
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert readme_commands()[1] == "pip install -e . && minifcn train --out runs/shapes-fcn8s"  # after the venv


def test_every_readme_command_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MINIFCN_DEVICE", "cpu")
    fake_inputs(tmp_path)
    skipped = []
    for command in readme_commands():
        if any(marker in command for marker in NEEDS_WHAT_CI_LACKS):
            skipped.append(command)
            continue
        run_quick(command, tmp_path)
    assert len(skipped) == len(NEEDS_WHAT_CI_LACKS), skipped
    capsys.readouterr()
    # what the README promises the commands leave behind
    for name in ("metrics.jsonl", "loss.png", "predictions.png", "checkpoint.npz", "best.npz"):
        assert (tmp_path / "runs" / "shapes-fcn8s" / name).is_file(), name
    assert (tmp_path / "predictions" / "photo_prediction.png").is_file()
    assert (tmp_path / "overlays" / "photo_overlay.png").is_file()
    assert (tmp_path / "runs" / "staged" / "staged_refinement.png").is_file()
    assert (tmp_path / "runs" / "examples" / "fcn_stages.png").is_file()
    written = {p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()}
    assert written <= {"runs", "predictions", "overlays", "photo.png", "my_data"}, written


def test_readme_metrics_keys_are_the_files_keys(tmp_path):
    """The key names the README lists for metrics.jsonl are exactly those of a row of the file."""
    import json  # noqa: PLC0415

    text = README.read_text(encoding="utf-8")
    section = text[text.index("`metrics.jsonl`, one JSON line"):text.index("`loss.png`")]
    listed = set(re.findall(r"`([a-z_]+)`", section)) - {"metrics"}
    code = main(["train", *QUICK_TRAIN, "--out", str(tmp_path / "run")])
    assert code == 0
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert listed == set(row), (listed ^ set(row))


@pytest.mark.parametrize("image", re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", README.read_text(encoding="utf-8")))
def test_readme_pictures_exist(image):
    path = ROOT / image
    assert path.is_file(), image
    assert path.stat().st_size < 500_000  # committed pictures stay small
