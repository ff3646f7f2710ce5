"""The training loop (minifcn/train.py): it learns, writes its run folder,
resumes exactly, stops on divergence, and rejects bad datasets before the first step."""
from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import minifcn.train as train_module
from minifcn.backend import device_of
from minifcn.checkpoint import load_checkpoint
from minifcn.data import DatasetError, get_dataset
from minifcn.train import TrainConfig, TrainingDiverged, load_model, train

QUIET = dict(progress=False, num_preview=2)


def tiny_fcn(out, **kw):
    """FCN-8s at width 1/32 on 4 shapes images of 16x16, batch 2 (2 steps an epoch), dropout on.
    (Padding 100 makes even a 16x16 image a 214x214 convolution.)"""
    cfg = dict(model="fcn8s", width=1 / 32, image_size=16, train_images=4, val_images=2, batch_size=2,
               epochs=2, lr=0.02, dropout=0.5, seed=3, out=str(out), progress=False, num_preview=1)
    cfg.update(kw)
    return TrainConfig(**cfg)


def chance_mean_iu(cfg):
    """The best mean IU of predictors that ignore the image, from the val split's class frequencies:
    the majority class everywhere (IU = its frequency for it, 0 for the others), or each pixel drawn
    from the class frequencies (expected IU_i ~ p_i / (2 - p_i))."""
    val = get_dataset("shapes", split="val", num_images=cfg.val_images, image_size=cfg.image_size, seed=cfg.seed)
    counts = np.bincount(np.concatenate([val[i][1].ravel() for i in range(len(val))]), minlength=6)
    p = counts[counts > 0] / counts.sum()  # classes absent from the truth are left out of mean IU
    majority = p.max() / len(p)
    random_guess = float(np.mean(p / (2 - p)))
    return max(majority, random_guess)


# -- learning, and the run folder ------------------------------------------------------------

@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A small encoder-decoder on 32 shapes images (the FCNs need far longer from scratch: see
    test_fcn8s_loss_falls). Deterministic: seeded model, order, augmentation."""
    out = tmp_path_factory.mktemp("learn")
    cfg = TrainConfig(model="encoder-decoder", width=1 / 16, image_size=32, train_images=32, val_images=16,
                      batch_size=2, epochs=6, lr=0.05, schedule="constant", seed=0, out=str(out), **QUIET)
    logs = []
    history = train(cfg, log=logs.append)
    return cfg, history, out, logs


def test_loss_falls_and_mean_iu_beats_chance(learned):
    cfg, history, _, _ = learned
    chance = chance_mean_iu(cfg)
    assert 0.05 < chance < 0.4  # mostly background, 6 classes
    losses = [row["train_loss"] for row in history]
    assert losses[-1] < 0.4 * losses[0], losses
    best = max(row["mean_iu"] for row in history)
    assert best > 2 * chance and best > chance + 0.15, (best, chance)
    assert history[-1]["pixel_acc"] > history[0]["pixel_acc"]


def test_run_folder(learned):
    cfg, history, out, logs = learned
    assert sorted(os.listdir(out)) == ["best.npz", "checkpoint.npz", "loss.png", "metrics.jsonl", "predictions.png"]
    def strict(token):
        raise AssertionError(f"metrics.jsonl holds the non-standard JSON token {token}")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=strict) for line in lines]
    assert len(rows) == cfg.epochs
    for i, row in enumerate(rows):
        assert {"epoch", "train_loss", "pixel_acc", "mean_acc", "mean_iu", "fwiu", "seconds"} <= set(row)
        assert row["epoch"] == i + 1 and row["seconds"] > 0
        for k in ("train_loss", "pixel_acc", "mean_acc", "mean_iu", "fwiu", "lr", "seconds"):
            assert row[k] == pytest.approx(history[i][k], rel=1e-12), k
        assert all(0 <= row[k] <= 1 for k in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"))
        # an absent class's IU is NaN in memory and null in the file
        assert [None if math.isnan(v) else pytest.approx(v) for v in history[i]["per_class_iu"]] == row["per_class_iu"]
    for png in ("loss.png", "predictions.png"):
        with Image.open(out / png) as im:
            im.load()
            assert im.size[0] > 50 and im.size[1] > 50
    # checkpoint: the last epoch; best: the epoch of the best mean IU
    _, meta = load_checkpoint(out / "checkpoint.npz")
    _, best_meta = load_checkpoint(out / "best.npz")
    assert meta["epoch"] == cfg.epochs - 1
    best_epoch = max(range(len(history)), key=lambda e: history[e]["mean_iu"])
    assert best_meta["epoch"] == best_epoch
    assert meta["config"]["model"] == "encoder-decoder" and meta["class_names"][0] == "background"
    assert any("epoch 6/6" in line for line in logs)


def test_checkpoint_rebuilds_the_trained_model(learned):
    """load_model gives back the network that scored the last epoch's metrics."""
    cfg, history, out, _ = learned
    model, meta = load_model(out / "checkpoint.npz")
    from minifcn.data import IMAGENET_MEAN_RGB, DataLoader  # noqa: PLC0415
    from minifcn.train import evaluate  # noqa: PLC0415

    val = get_dataset("shapes", split="val", num_images=cfg.val_images, image_size=cfg.image_size, seed=cfg.seed)
    scores = evaluate(model, DataLoader(val, cfg.batch_size, mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale), meta["num_classes"])
    assert scores["mean_iu"] == pytest.approx(history[-1]["mean_iu"])


def test_one_epoch_on_each_device(tmp_path, device):
    """train(..., device=...) runs on the GPU as on the CPU: the model lives there, its checkpoint
    loads back on either device, and the scores are finite."""
    cfg = tiny_fcn(tmp_path, epochs=1, device=device)
    history = train(cfg, log=lambda *a: None)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["mean_iu"] <= 1
    for where in ("cpu", device):
        model, _ = load_model(tmp_path / "checkpoint.npz", device=where)
        assert {device_of(p.data) for p in model.parameters()} == {where}


@pytest.fixture(scope="module")
def fcn_runs(tmp_path_factory):
    """Tiny FCN-8s runs shared by the tests below: 2 epochs uninterrupted (constant and poly
    schedules), and the first epoch alone (constant), kept pristine: tests resume copies of it."""
    root = tmp_path_factory.mktemp("fcn")
    full = train(tiny_fcn(root / "full", schedule="constant"), log=lambda *a: None)
    full_poly = train(tiny_fcn(root / "full-poly"), log=lambda *a: None)
    first = train(tiny_fcn(root / "first", epochs=1, schedule="constant"), log=lambda *a: None)
    return {"full": full, "full_poly": full_poly, "first": first, "root": root}


def copy_of_first_epoch(fcn_runs, tmp_path):
    target = tmp_path / "split"
    shutil.copytree(fcn_runs["root"] / "first", target)
    return target


def test_fcn8s_loss_falls(fcn_runs):
    """The FCN-8s loop runs end to end with dropout and the poly schedule, and its loss falls.
    (From scratch, FCN-8s first learns the class prior; beating chance takes minutes, not seconds.)"""
    history = fcn_runs["full_poly"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[-1]["train_loss"] < 0.9 * history[0]["train_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in history)
    assert history[-1]["lr"] < history[0]["lr"] < 0.02  # poly decay, per iteration


# -- resume ------------------------------------------------------------------------------------

def test_resume_continues_exactly(fcn_runs, tmp_path):
    """Epoch 2 after a resume equals epoch 2 of an uninterrupted run: weights, momentum,
    dropout RNG (p = 0.5), data order and schedule position are all restored."""
    full, first = fcn_runs["full"], fcn_runs["first"]
    assert first[0]["train_loss"] == pytest.approx(full[0]["train_loss"], rel=1e-12)
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    resumed = train(tiny_fcn(split, resume=True, schedule="constant"), log=lambda *a: None)
    assert [r["epoch"] for r in resumed] == [1, 2]
    assert resumed[1]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-6)
    assert resumed[1]["mean_iu"] == pytest.approx(full[1]["mean_iu"], rel=1e-6)
    a, _ = load_checkpoint(fcn_runs["root"] / "full" / "checkpoint.npz")
    b, _ = load_checkpoint(split / "checkpoint.npz")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
    lines = (split / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_resume_needs_the_dropout_state(fcn_runs, tmp_path, monkeypatch):
    """Power of the test above: without restoring the dropout generators, epoch 2 differs."""
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    monkeypatch.setattr(train_module, "_set_dropout_states", lambda model, states: None)
    resumed = train(tiny_fcn(split, resume=True, schedule="constant"), log=lambda *a: None)
    assert resumed[1]["train_loss"] != pytest.approx(fcn_runs["full"][1]["train_loss"], rel=1e-6)


def test_resume_after_an_interruption_with_the_poly_schedule(fcn_runs, tmp_path, monkeypatch):
    """A 2-epoch run interrupted (Ctrl-C) after epoch 1's checkpoint, then resumed, matches the
    uninterrupted run, the poly schedule's position included. (A run started with epochs=1 would
    not: its poly schedule reaches 0 at the end of its own single epoch.)"""
    real = train_module.write_predictions

    def interrupt_after_epoch_1(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_predictions", interrupt_after_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_fcn(tmp_path), log=lambda *a: None)
    monkeypatch.undo()
    resumed = train(tiny_fcn(tmp_path, resume=True), log=lambda *a: None)
    full = fcn_runs["full_poly"]
    assert resumed[1]["train_loss"] == pytest.approx(full[1]["train_loss"], rel=1e-6)
    assert resumed[1]["lr"] == pytest.approx(full[1]["lr"], rel=1e-12)


# -- divergence --------------------------------------------------------------------------------

def test_divergence_stops_and_keeps_the_last_checkpoint(fcn_runs, tmp_path):
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    ckpt = split / "checkpoint.npz"
    before = ckpt.read_bytes()
    metrics_before = (split / "metrics.jsonl").read_text()
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged) as err:
        train(tiny_fcn(split, epochs=3, resume=True, lr=1e6), log=lambda *a: None)
    message = str(err.value)
    assert "lr=1000000.0" in message and "reduction='mean'" in message
    assert "learning rate" in message and str(ckpt) in message and "kept" in message
    assert ckpt.read_bytes() == before
    assert (split / "metrics.jsonl").read_text() == metrics_before  # no NaN row


def test_divergence_with_a_summed_loss_explains_the_normalisation(tmp_path):
    """The reference's summed loss with a mean-loss learning rate: NaN, and the message says
    the learning rate must be about (pixels per batch) times smaller."""
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged, match=r"reduction='sum'.*pixels per batch") as err:
        train(tiny_fcn(tmp_path, epochs=6, reduction="sum", lr=0.02), log=lambda *a: None)
    assert "lr=0.02" in str(err.value)


# -- bad datasets: rejected before the first step ------------------------------------------------

def write_folder(root, split, n=2, size=(16, 16), labels=(0, 1, 2)):
    images, masks = root / split / "images", root / split / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(split))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(images / f"img{i}.png")
        Image.fromarray(rng.choice(np.array(labels, np.uint8), size)).save(masks / f"img{i}.png")
    return images, masks


@pytest.fixture
def no_steps(monkeypatch):
    """Fail the test if the optimiser ever takes a step."""
    def step(self):
        raise AssertionError("an optimisation step was taken on a bad dataset")
    monkeypatch.setattr(train_module.SGD, "step", step)


def folder_cfg(data_dir, out):
    return TrainConfig(model="fcn32s", dataset="folder", data_dir=str(data_dir), width=1 / 32, batch_size=1,
                       epochs=1, crop_size=None, out=str(out), **QUIET)


def test_folder_dataset_trains(tmp_path):
    """The fixture layout is right: a clean folder dataset trains (so the failures below are the data's)."""
    write_folder(tmp_path / "data", "train", labels=(0, 1, 2, 255))
    write_folder(tmp_path / "data", "val", n=1, labels=(0, 2))
    history = train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)
    assert len(history) == 1 and math.isfinite(history[0]["train_loss"])
    assert len(history[0]["per_class_iu"]) == 3  # num_classes inferred from the masks: 0..2


def test_missing_dataset_folder(tmp_path, no_steps):
    with pytest.raises(DatasetError, match="nowhere.*'train'"):
        train(folder_cfg(tmp_path / "nowhere", tmp_path / "out"), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_empty_dataset(tmp_path, no_steps):
    (tmp_path / "data" / "train" / "images").mkdir(parents=True)
    (tmp_path / "data" / "train" / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no images found in .*train[/\\]images"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_image_without_mask(tmp_path, no_steps):
    write_folder(tmp_path / "data", "train")
    images, _ = write_folder(tmp_path / "data", "val")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "lonely.png")
    with pytest.raises(DatasetError, match=r"image without mask: .*lonely\.png"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_mask_of_another_size(tmp_path, no_steps):
    _, masks = write_folder(tmp_path / "data", "train", n=3)
    write_folder(tmp_path / "data", "val")
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(masks / "img1.png")
    with pytest.raises(DatasetError, match=r"img1\.png.*mask size 16x12 \(WxH\) differs from image size 16x16"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_label_out_of_range(tmp_path, no_steps):
    """num_classes comes from the train masks (0..2); a val mask with label 7 is named with its value."""
    write_folder(tmp_path / "data", "train")
    _, masks = write_folder(tmp_path / "data", "val", labels=(0, 255))
    bad = np.zeros((16, 16), np.uint8)
    bad[3, 4] = 7
    Image.fromarray(bad).save(masks / "img0.png")
    with pytest.raises(DatasetError, match=r"val[/\\]masks[/\\]img0\.png.*label value 7 >= num_classes=3"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_every_problem_is_listed(tmp_path, no_steps):
    """Several bad files: one error listing each of them (not just the first)."""
    write_folder(tmp_path / "data", "train")
    images, masks = write_folder(tmp_path / "data", "val", n=3)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(masks / "img0.png")
    os.remove(masks / "img2.png")
    with pytest.raises(DatasetError) as err:
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)
    message = str(err.value)
    assert "2 problem(s)" in message
    assert "img0.png" in message and "mask size 8x8" in message
    assert f"image without mask: {images / 'img2.png'}" in message


def test_train_image_without_mask(tmp_path, no_steps):
    """In the train split too (where the class count is inferred from the masks)."""
    images, masks = write_folder(tmp_path / "data", "train", n=2)
    write_folder(tmp_path / "data", "val")
    os.remove(masks / "img1.png")
    with pytest.raises(DatasetError, match=r"img1\.png"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_class_weights_by_hand():
    """Pixel counts 70 / 10 / 20 / 0: shares .7 / .1 / .2, median of the present ones .2."""
    counts = [70, 10, 20, 0]
    assert train_module.class_weights(counts, "none") is None
    np.testing.assert_allclose(train_module.class_weights(counts, "balanced"), [0.2 / 0.7, 2.0, 1.0, 0.0])
    np.testing.assert_allclose(train_module.class_weights(counts, "sqrt-balanced"),
                               np.sqrt([0.2 / 0.7, 2.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="'inverse'"):
        train_module.class_weights(counts, "inverse")
    with pytest.raises(ValueError, match="no labelled pixels"):
        train_module.class_weights([0, 0], "balanced")


def test_training_with_class_weights_logs_them_and_learns(tmp_path, monkeypatch):
    losses = []
    make_loss = train_module.make_loss
    monkeypatch.setattr(train_module, "make_loss", lambda *a: losses.append(make_loss(*a)) or losses[-1])
    lines = []
    cfg = TrainConfig(out=str(tmp_path / "cw"), width=0.0625, epochs=1, train_images=8, val_images=4,
                      image_size=32, class_weight="sqrt-balanced", progress=False)
    history = train(cfg, log=lines.append)
    assert any(line.startswith("class weights (sqrt-balanced): ") for line in lines)
    weights = [float(w) for w in next(l for l in lines if l.startswith("class weights")).split(": ")[1].split(", ")]
    assert len(weights) == 6 and weights[0] < 1 < max(weights)  # background, the most frequent class, weighs least
    np.testing.assert_allclose(losses[0].class_weight, weights, atol=1e-3)  # and the loss uses them
    assert math.isfinite(history[-1]["train_loss"])
