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

QUIET = dict(progress=False, num_preview=2, ranks=1)  # in this process (monkeypatches reach it)


def tiny_fcn(out, **kw):
    """FCN-8s at width 1/32 on 4 shapes images of 16x16, batch 2 (2 steps an epoch), dropout on, no warm-up
    (the default's 100 steps would span the whole run). (Padding 100 makes even a 16x16 image a 214x214
    convolution.)"""
    cfg = dict(model="fcn8s", width=1 / 32, image_size=16, train_images=4, val_images=2, batch_size=2, ranks=1,
               epochs=2, lr=0.02, warmup=0, dropout=0.5, seed=3, out=str(out), progress=False, num_preview=1)
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
        steps = row["step_loss"]  # every step's loss, for loss.png; train_loss is their mean
        assert len(steps) == cfg.train_images // cfg.batch_size
        assert np.mean(steps) == pytest.approx(row["train_loss"], rel=1e-4)
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


def test_training_crop_is_decided_in_one_place():
    """shapes images larger than TRAINING_CROPS' side train on crops of it; smaller ones, other datasets
    and --crop-size 0 train whole; an explicit side wins; a negative one is refused naming the option."""
    from minifcn.train import TRAINING_CROPS, check_config, training_crop  # noqa: PLC0415

    side = TRAINING_CROPS["shapes"]
    assert training_crop(TrainConfig()) == side < TrainConfig().image_size
    assert training_crop(TrainConfig(image_size=side)) is None
    assert training_crop(TrainConfig(crop_size=0)) is None
    assert training_crop(TrainConfig(crop_size=64)) == 64
    assert training_crop(TrainConfig(dataset="folder", data_dir="x")) is None
    with pytest.raises(ValueError, match=r"crop_size \(--crop-size\) must be .* got -1"):
        check_config(TrainConfig(crop_size=-1))


def test_default_shapes_run_trains_on_crops_and_scores_whole_images(tmp_path, monkeypatch):
    """The loader of the training images gets the training crop, the held-out loader none; the log says so."""
    seen = []
    real = train_module.DataLoader

    def spy(dataset, *args, **kwargs):
        seen.append((dataset.split, kwargs.get("crop_size")))
        return real(dataset, *args, **kwargs)

    monkeypatch.setattr(train_module, "DataLoader", spy)
    logs = []
    train(tiny_fcn(tmp_path / "a", epochs=1, image_size=40), log=logs.append)
    monkeypatch.setitem(train_module.TRAINING_CROPS, "shapes", 24)
    train(tiny_fcn(tmp_path / "b", epochs=1, image_size=40), log=logs.append)
    assert seen[:2] == [("train", None), ("val", None)]  # 40 x 40 images <= 96: whole
    assert ("train", 24) in seen[2:] and ("val", None) in seen[2:]
    assert "training on random 24 x 24 crops, scored whole" in "\n".join(logs)
    # each checkpoint records the crop its run trained on, not "the default" (which may change)
    assert load_checkpoint(tmp_path / "a" / "checkpoint.npz")[1]["config"]["crop_size"] == 0
    assert load_checkpoint(tmp_path / "b" / "checkpoint.npz")[1]["config"]["crop_size"] == 24


def test_checkpoint_rebuilds_the_trained_model(learned):
    """load_model gives back the network that scored the last epoch's metrics."""
    cfg, history, out, _ = learned
    model, meta = load_model(out / "checkpoint.npz")
    from minifcn.data import IMAGENET_MEAN_RGB, DataLoader  # noqa: PLC0415
    from minifcn.train import evaluate  # noqa: PLC0415

    val = get_dataset("shapes", split="val", num_images=cfg.val_images, image_size=cfg.image_size, seed=cfg.seed)
    scores = evaluate(model, DataLoader(val, cfg.batch_size, mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale), meta["num_classes"])
    assert scores["mean_iu"] == pytest.approx(history[-1]["mean_iu"])


def test_scores_do_not_depend_on_the_evaluation_batch(learned):
    """Scoring in batches of eval_batch_size (what train and eval use for shapes) gives the scores of
    one image at a time: a batch mixes no images up and drops none (16 images: not a multiple of 3)."""
    cfg, _, out, _ = learned
    model, meta = load_model(out / "checkpoint.npz")
    from minifcn.data import IMAGENET_MEAN_RGB, DataLoader  # noqa: PLC0415
    from minifcn.train import eval_batch_size, evaluate  # noqa: PLC0415

    assert eval_batch_size("shapes") > 1 and eval_batch_size("folder") == eval_batch_size("voc") == 1
    val = get_dataset("shapes", split="val", num_images=cfg.val_images, image_size=cfg.image_size, seed=cfg.seed)
    scores = [evaluate(model, DataLoader(val, b, mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale), meta["num_classes"])
              for b in (1, 3, eval_batch_size("shapes"))]
    for other in scores[1:]:
        assert other["pixel_acc"] == pytest.approx(scores[0]["pixel_acc"], abs=1e-5)
        assert other["per_class_iu"] == pytest.approx(scores[0]["per_class_iu"], abs=1e-4, nan_ok=True)


def test_evaluate_keeps_the_predictions_it_scored_and_the_ranks_share_them(learned):
    """keep=: the labels evaluate scored for those samples are a forward of each image alone; two shards
    (batches of 3) each keep their own, and gather_predictions puts them together in index order."""
    cfg, _, out, _ = learned
    model, meta = load_model(out / "checkpoint.npz")
    from minifcn.data import IMAGENET_MEAN_RGB, DataLoader  # noqa: PLC0415
    from minifcn.distributed import SingleProcess  # noqa: PLC0415
    from minifcn.train import evaluate, gather_predictions, predict_labels  # noqa: PLC0415

    val = get_dataset("shapes", split="val", num_images=cfg.val_images, image_size=cfg.image_size, seed=cfg.seed)
    kw = dict(mean=IMAGENET_MEAN_RGB, scale=cfg.input_scale)
    direct = [predict_labels(model, x)[0] for _, (x, _) in zip(range(8), DataLoader(val, 1, **kw))]
    kept = [evaluate(model, DataLoader(val, 3, num_shards=2, shard=r, **kw), meta["num_classes"], keep=range(8))["kept"]
            for r in (0, 1)]
    assert sorted(kept[0]) == [0, 1, 2, 6, 7] and sorted(kept[1]) == [3, 4, 5]
    gathered = gather_predictions(SingleProcess(), {**kept[0], **kept[1]}, 8)
    assert len(gathered) == 8
    for mine, alone in zip(gathered, direct):
        assert mine.dtype == np.int64 and np.array_equal(mine, alone)
    assert "kept" not in evaluate(model, DataLoader(val, 3, **kw), meta["num_classes"])


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
                      image_size=32, class_weight="sqrt-balanced", progress=False, ranks=1)
    history = train(cfg, log=lines.append)
    assert any(line.startswith("class weights (sqrt-balanced): ") for line in lines)
    weights = [float(w) for w in next(l for l in lines if l.startswith("class weights")).split(": ")[1].split(", ")]
    assert len(weights) == 6 and weights[0] < 1 < max(weights)  # background, the most frequent class, weighs least
    np.testing.assert_allclose(losses[0].class_weight, weights, atol=1e-3)  # and the loss uses them
    assert math.isfinite(history[-1]["train_loss"])


# -- staged training: --init-from ------------------------------------------------------------

@pytest.fixture(scope="module")
def fcn32s_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stage") / "fcn32s"
    train(tiny_fcn(out, model="fcn32s", epochs=1), log=lambda *a: None)
    return out / "best.npz"


def test_init_from_copies_every_matching_parameter(fcn32s_run, tmp_path):
    """FCN-16s from FCN-32s: the backbone and score_fr are copied value for value; upscore2, score_pool4
    and upscore16 (absent from FCN-32s) keep their initialisation; FCN-32s's upscore is not used."""
    from minifcn.models import build_model  # noqa: PLC0415
    from minifcn.train import init_from_checkpoint  # noqa: PLC0415

    saved, _ = load_checkpoint(fcn32s_run)
    model = build_model("fcn16s", num_classes=6, width=1 / 32, seed=5, learn_upsampling=True)
    fresh = {k: v.copy() for k, v in model.state_dict().items()}
    copied, new, mismatched = init_from_checkpoint(model, fcn32s_run)
    assert new == ["upscore2.weight", "score_pool4.weight", "score_pool4.bias", "upscore16.weight"]
    assert mismatched == [] and len(copied) == len(fresh) - 4 and "score_fr.weight" in copied
    state = model.state_dict()
    for name in copied:
        np.testing.assert_array_equal(state[name], saved[f"model.{name}"])
    assert not np.array_equal(fresh["conv1_1.weight"], state["conv1_1.weight"])  # it did change
    for name in new:
        np.testing.assert_array_equal(state[name], fresh[name])


def test_init_from_through_train_logs_copied_and_new(fcn32s_run, tmp_path):
    logs = []
    train(tiny_fcn(tmp_path / "fcn16s", model="fcn16s", epochs=1, init_from=str(fcn32s_run)), log=logs.append)
    line = next(line for line in logs if line.startswith("init from"))
    assert "copied 32 parameters" in line and "new 4 (upscore2, score_pool4, upscore16)" in line
    _, meta = load_checkpoint(tmp_path / "fcn16s" / "best.npz")
    assert meta["config"]["init_from"] == str(fcn32s_run)
    # resuming the same command continues from its own checkpoint, not from the FCN-32s again
    logs = []
    train(tiny_fcn(tmp_path / "fcn16s", model="fcn16s", epochs=2, init_from=str(fcn32s_run), resume=True),
          log=logs.append)
    assert not any(line.startswith("init from") for line in logs)
    assert any("applies to a fresh start only" in line for line in logs)


def test_init_from_reports_shape_mismatches(fcn32s_run):
    """Another number of classes: score_fr's weight and bias differ in shape and stay as initialised."""
    from minifcn.models import build_model  # noqa: PLC0415
    from minifcn.train import init_from_checkpoint  # noqa: PLC0415

    model = build_model("fcn16s", num_classes=3, width=1 / 32)
    copied, new, mismatched = init_from_checkpoint(model, fcn32s_run)
    assert mismatched == ["score_fr.weight", "score_fr.bias"] and "conv5_3.weight" in copied


def test_init_from_refuses_a_checkpoint_that_shares_nothing(fcn32s_run, tmp_path):
    from minifcn.checkpoint import CheckpointError, save_checkpoint  # noqa: PLC0415
    from minifcn.models import build_model  # noqa: PLC0415
    from minifcn.train import init_from_checkpoint  # noqa: PLC0415

    other = tmp_path / "other.npz"
    save_checkpoint(other, {"model.encoder.weight": np.zeros((2, 3))}, {"format": "minifcn-checkpoint-1"})
    model = build_model("fcn8s", num_classes=6, width=1 / 32)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="shares no parameter.*no name in common"):
        init_from_checkpoint(model, other)
    wide = build_model("fcn32s", num_classes=6, width=1 / 16, learn_upsampling=True)
    wide.score_fr.bias.data = np.zeros(7, np.float32)  # so that not even score_fr.bias fits
    wide.upscore.weight.data = np.zeros((7, 7, 64, 64), np.float32)
    save_checkpoint(tmp_path / "wide.npz", {f"model.{k}": v for k, v in wide.state_dict().items()}, {})
    with pytest.raises(CheckpointError, match="shapes differ: conv1_1.weight"):
        init_from_checkpoint(build_model("fcn32s", num_classes=6, width=1 / 32), tmp_path / "wide.npz")
    for name, value in model.state_dict().items():  # nothing was changed
        np.testing.assert_array_equal(value, before[name])
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"model.conv1_1.weight": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError):  # read by load_checkpoint: never unpickled
        init_from_checkpoint(model, pickled)


# -- the run folder is never destroyed by accident ------------------------------------------------

def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_run_folder_is_refused_without_resume_or_overwrite(fcn_runs, tmp_path):
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    before = folder_bytes(split)
    with pytest.raises(ValueError, match="is not empty") as err:
        train(tiny_fcn(split), log=lambda *a: None)
    assert "--resume" in str(err.value) and "--overwrite" in str(err.value) and "checkpoint.npz" in str(err.value)
    assert folder_bytes(split) == before


def test_overwrite_replaces_the_run_files_and_keeps_the_rest(fcn_runs, tmp_path):
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    (split / "notes.txt").write_text("mine")
    before = folder_bytes(split)
    with pytest.raises(DatasetError):  # a run that cannot start deletes nothing, --overwrite or not
        train(tiny_fcn(split, overwrite=True, dataset="folder", data_dir=str(tmp_path / "none")), log=lambda *a: None)
    assert folder_bytes(split) == before
    lines = []
    history = train(tiny_fcn(split, epochs=1, overwrite=True, seed=4), log=lines.append)
    assert any("--overwrite" in line for line in lines)
    assert (split / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["train_loss"] for line in (split / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([history[0]["train_loss"]], rel=1e-12)
    assert load_checkpoint(split / "checkpoint.npz")[1]["config"]["seed"] == 4


def test_resume_without_a_checkpoint_is_an_error_naming_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(ValueError, match="no checkpoint") as err:
        train(tiny_fcn(out, resume=True), log=lambda *a: None)
    assert str(out / "checkpoint.npz") in str(err.value)
    assert (out / "metrics.jsonl").read_text() == '{"epoch": 1}\n'  # the history is not overwritten
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_fcn(tmp_path / "absent", resume=True), log=lambda *a: None)


def test_out_naming_a_file(tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"--out.*a-file.*is a file, not a folder"):
        train(tiny_fcn(target), log=lambda *a: None)


@pytest.mark.parametrize("name, value, option", [
    ("epochs", -1, "--epochs"), ("epochs", 0, "--epochs"), ("seed", -1, "--seed"),
    ("input_scale", float("nan"), "--input-scale"), ("lr", float("nan"), "--lr"), ("lr", 0.0, "--lr"),
    ("batch_size", 0, "--batch-size"), ("momentum", -0.5, "--momentum"), ("num_classes", 1, "--num-classes"),
])
def test_settings_that_cannot_train_are_refused_naming_the_option(fcn_runs, tmp_path, name, value, option):
    """Before anything is touched: a finished run's folder keeps its metrics (--epochs -1 used to delete them)."""
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    before = folder_bytes(split)
    with np.errstate(all="ignore"), pytest.raises(ValueError) as err:
        train(tiny_fcn(split, resume=True, **{name: value}), log=lambda *a: None)
    assert option in str(err.value) and repr(value) in str(err.value)
    assert folder_bytes(split) == before


# -- the last good checkpoint is good ------------------------------------------------------------

@pytest.fixture
def first_param(monkeypatch):
    """The first parameter array the optimiser steps (what poisoning changes)."""
    import minifcn.optim as optim  # noqa: PLC0415
    seen = {}
    real_init = optim.SGD.__init__

    def init(self, model, *args, **kwargs):
        real_init(self, model, *args, **kwargs)
        seen["model"] = model
    monkeypatch.setattr(optim.SGD, "__init__", init)
    return seen


@pytest.mark.parametrize("poison, says", [
    (lambda m: m.conv1_1.weight.data.__setitem__((0, 0, 0, 0), np.nan), "parameter 'conv1_1.weight' holds 1 NaN"),
    (lambda m: [p.data.__imul__(np.float32(1e30)) for p in (m.conv1_1.weight, m.conv1_2.weight)],
     "validation logits hold NaN or infinity"),  # finite weights (< 1e30), overflowing logits
])
def test_nothing_is_written_from_nonfinite_weights_or_logits(fcn_runs, tmp_path, monkeypatch, first_param,
                                                             poison, says):
    """NaN weights, or weights so large that the logits overflow, after the last step of epoch 2:
    epoch 1's checkpoint, best checkpoint and metrics stay as they were and no NaN row is written."""
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    before = folder_bytes(split)
    real = train_module.SGD.step
    steps = []

    def step(self):
        real(self)
        steps.append(1)
        if len(steps) == 2:  # 2 steps an epoch: the last one of epoch 2
            poison(first_param["model"])

    monkeypatch.setattr(train_module.SGD, "step", step)
    with np.errstate(all="ignore"), pytest.raises(TrainingDiverged) as err:
        train(tiny_fcn(split, resume=True), log=lambda *a: None)
    assert says in str(err.value) and "epoch 2" in str(err.value) and "kept" in str(err.value)
    after = folder_bytes(split)
    for name in ("checkpoint.npz", "best.npz", "metrics.jsonl"):
        assert after[name] == before[name], name


def test_a_checkpoint_with_nonfinite_weights_is_refused_by_load_model(fcn_runs, tmp_path):
    """What eval and predict (and resume) load through: the first bad parameter is named."""
    from minifcn.checkpoint import CheckpointError, save_checkpoint  # noqa: PLC0415
    arrays, meta = load_checkpoint(fcn_runs["root"] / "first" / "checkpoint.npz")
    arrays["model.score_fr.weight"] = arrays["model.score_fr.weight"].copy()
    arrays["model.score_fr.weight"].flat[[3, 7]] = [np.inf, np.nan]
    save_checkpoint(tmp_path / "bad.npz", arrays, meta)
    with pytest.raises(CheckpointError, match=r"parameter 'score_fr\.weight' holds 2 NaN or infinite"):
        load_model(tmp_path / "bad.npz")


# -- interrupts and full disks -------------------------------------------------------------------

def test_temporaries_of_a_killed_save_are_removed_at_the_next_start(fcn_runs, tmp_path):
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    left = [split / ".checkpoint.npz.k1ll3d.npz", split / ".best.npz.abc.npz", split / ".metrics.jsonl.x.tmp"]
    for path in left:
        path.write_bytes(b"PK\x03\x04 a full-size temporary")
    lines = []
    train(tiny_fcn(split, resume=True, schedule="constant"), log=lines.append)
    assert not any(path.exists() for path in left)
    assert sum("left by an interrupted save" in line for line in lines) == 3
    assert sorted(p.name for p in split.iterdir()) == sorted(train_module.RUN_FILES)


def test_a_full_disk_changes_neither_file_and_names_the_one_it_could_not_write(fcn_runs, tmp_path, monkeypatch):
    """ENOSPC while epoch 2's checkpoint is written: metrics.jsonl is not one epoch ahead of it."""
    import errno  # noqa: PLC0415
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    before = folder_bytes(split)

    def full(f, **kwargs):
        f.write(b"PK\x03\x04 part of an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(OSError) as err:
        train(tiny_fcn(split, resume=True), log=lambda *a: None)
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write {split / 'checkpoint.npz'}" in str(err.value) and "No space left" in str(err.value)
    assert "nothing of epoch 2 was saved" in str(err.value)
    after = folder_bytes(split)
    assert after["metrics.jsonl"] == before["metrics.jsonl"] and after["checkpoint.npz"] == before["checkpoint.npz"]
    assert not [p for p in split.iterdir() if p.name.startswith(".")]


def test_ctrl_c_says_where_the_last_checkpoint_is(fcn_runs, tmp_path, monkeypatch):
    split = copy_of_first_epoch(fcn_runs, tmp_path)

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.SGD, "step", interrupted)
    with pytest.raises(train_module.TrainingInterrupted) as err:
        train(tiny_fcn(split, resume=True), log=lambda *a: None)
    message = str(err.value)
    assert message.startswith("interrupted: ") and "\n" not in message
    assert f"{split / 'checkpoint.npz'} (after epoch 1 of 2)" in message and "--resume" in message


# -- resume the run you meant ----------------------------------------------------------------

def test_resume_with_other_settings_names_every_difference(fcn_runs, tmp_path):
    split = copy_of_first_epoch(fcn_runs, tmp_path)
    before = folder_bytes(split)
    with pytest.raises(ValueError) as err:
        train(tiny_fcn(split, resume=True, width=1 / 16, model="fcn16s", image_size=24, dataset="shapes"),
              log=lambda *a: None)
    message = str(err.value)
    for difference in ("width 0.03125 -> 0.0625", "model 'fcn8s' -> 'fcn16s'", "image-size 16 -> 24"):
        assert difference in message, message
    assert "dataset" not in message.split("now):")[1]  # unchanged settings are not listed
    assert folder_bytes(split) == before


# -- data that cannot be learned from --------------------------------------------------------

def write_masks(root, split, masks):
    """One random image per mask (a list of uint8 arrays)."""
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, mask in enumerate(masks):
        Image.fromarray(rng.integers(0, 256, (*mask.shape, 3), dtype=np.uint8)).save(root / split / "images" / f"m{i}.png")
        Image.fromarray(mask).save(root / split / "masks" / f"m{i}.png")


def test_all_ignore_masks_are_refused(tmp_path, no_steps):
    write_masks(tmp_path / "data", "train", [np.full((16, 16), 255, np.uint8)] * 2)
    write_masks(tmp_path / "data", "val", [np.full((16, 16), 255, np.uint8)])
    with pytest.raises(DatasetError, match=r"every pixel of its 2 training mask\(s\) is 255 \(ignore\)"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_all_background_masks_are_refused(tmp_path, no_steps):
    write_masks(tmp_path / "data", "train", [np.zeros((16, 16), np.uint8)] * 2)
    write_masks(tmp_path / "data", "val", [np.zeros((16, 16), np.uint8)])
    with pytest.raises(DatasetError, match=r"every labelled pixel .* is class 0 \(512 pixels\).*two classes"):
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)


def test_a_stray_label_is_named_with_its_file_and_pixel_count(tmp_path, no_steps):
    masks = [np.random.default_rng(i).integers(0, 3, (16, 16)).astype(np.uint8) for i in range(3)]
    masks[1][5, 6] = 200
    write_masks(tmp_path / "data", "train", masks)
    write_masks(tmp_path / "data", "val", masks[:1])
    with pytest.raises(DatasetError) as err:
        train(folder_cfg(tmp_path / "data", tmp_path / "out"), log=lambda *a: None)
    message = str(err.value)
    assert "201-class model" in message and "--num-classes" in message
    assert f"value 200 (1 pixel(s), first in {tmp_path / 'data' / 'train' / 'masks' / 'm1.png'}" in message
    # saying --num-classes 3 turns it into an ordinary out-of-range label, named with its file
    with pytest.raises(DatasetError, match=r"m1\.png.*label value 200 >= num_classes=3"):
        train(TrainConfig(**{**asdict_cfg(folder_cfg(tmp_path / "data", tmp_path / "out")), "num_classes": 3}),
              log=lambda *a: None)


def asdict_cfg(cfg):
    from dataclasses import asdict  # noqa: PLC0415
    return asdict(cfg)


def test_num_classes_covers_classes_the_masks_do_not_show(tmp_path):
    """Labels 0 and 12 only (a subset of a larger label set): inferring is refused, saying it is trains."""
    masks = [np.where(np.random.default_rng(i).random((16, 16)) < 0.3, 12, 0).astype(np.uint8) for i in range(2)]
    write_masks(tmp_path / "data", "train", masks)
    write_masks(tmp_path / "data", "val", masks[:1])
    cfg = folder_cfg(tmp_path / "data", tmp_path / "out")
    with pytest.raises(DatasetError, match="13-class model"):
        train(cfg, log=lambda *a: None)
    history = train(TrainConfig(**{**asdict_cfg(cfg), "num_classes": 13}), log=lambda *a: None)
    assert len(history[0]["per_class_iu"]) == 13


# -- SIGKILL at random moments: the run folder stays consistent and resumes exactly ----------------

KILL_CHILD = r"""
import sys, time
import numpy as np
import minifcn.train as T
from minifcn.cli import main

def mark(what):
    print(what, flush=True)

step, evaluate, savez = T.SGD.step, T.evaluate, np.savez

def marked_step(self):
    mark("STEP")
    step(self)

def marked_evaluate(*args, **kwargs):
    mark("EVAL")
    return evaluate(*args, **kwargs)

def marked_savez(f, **arrays):
    mark("SAVE")                # killed from here on: a partial temporary
    savez(f, **arrays)
    mark("SAVED")               # killed here: a full-size temporary, not yet renamed
    time.sleep(0.03)

T.SGD.step, T.evaluate, np.savez = marked_step, marked_evaluate, marked_savez
sys.exit(main(sys.argv[1:]))
"""

KILL_RUN = dict(model="encoder-decoder", width=1 / 16, image_size=16, train_images=4, val_images=2, batch_size=2,
                ranks=1, epochs=4, lr=0.05, schedule="poly", dropout=0.0, seed=5)


def kill_run_args(out, resume):
    flags = {"model": "--model", "width": "--width", "image_size": "--image-size", "train_images": "--train-images",
             "val_images": "--val-images", "batch_size": "--batch-size", "ranks": "--ranks", "epochs": "--epochs", "lr": "--lr",
             "schedule": "--schedule", "dropout": "--dropout", "seed": "--seed"}
    args = ["train", "--out", str(out), "--no-progress", "--device", "cpu"]
    for name, flag in flags.items():
        args += [flag, str(KILL_RUN[name])]
    return args + (["--resume"] if resume else [])


def run_child(out, resume, kill_at=None, rng=None, timeout=120):
    """Start a training of KILL_RUN in another process; with ``kill_at=(marker, n)``, SIGKILL it a random
    0-10 ms after its n-th ``marker`` line. Returns (killed, stdout lines)."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-u", "-c", KILL_CHILD, *kill_run_args(out, resume)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    guard = threading.Timer(timeout, proc.kill)
    guard.start()
    lines, seen, killed = [], 0, False
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if kill_at and line.strip() == kill_at[0]:
                seen += 1
                if seen == kill_at[1]:
                    time.sleep(rng.uniform(0, 0.01))
                    proc.kill()
                    proc.wait()
                    killed = True
                    break
        err = proc.stderr.read()
        code = proc.wait()
    finally:
        guard.cancel()
        proc.kill()
        proc.stdout.close()
        proc.stderr.close()
    if not killed:
        assert code == 0, f"exit {code}\n" + "\n".join(lines[-20:]) + err
    return killed, lines


def check_consistent(out):
    """After a kill: a checkpoint (if any) loads and is finite, and metrics.jsonl is exactly its history."""
    ckpt, metrics = out / "checkpoint.npz", out / "metrics.jsonl"
    if not ckpt.exists():
        assert not metrics.exists() and not (out / "best.npz").exists()
        return 0
    _, meta = train_module.load_trusted_checkpoint(ckpt)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in meta["history"]] == list(range(1, meta["epoch"] + 2))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in meta["history"]]
    return meta["epoch"] + 1


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("kill-reference") / "run"
    return train(TrainConfig(out=str(out), **KILL_RUN, progress=False, num_preview=2), log=lambda *a: None)


def kill_and_resume(tmp_path, uninterrupted, kills, seed):
    """SIGKILL KILL_RUN ``kills`` times, at a step, the start of a save, a finished but unrenamed
    temporary, or an evaluation (in turn, at a random one of the next few), resuming each time."""
    rng = np.random.default_rng(seed)
    phases = ["STEP", "SAVE", "SAVED", "EVAL"]
    round_, done, temporaries_seen, cleaned = 0, 0, 0, 0
    out = tmp_path / f"round{round_}"
    progress = []
    while done < kills:
        resume = (out / "checkpoint.npz").exists()
        killed, lines = run_child(out, resume, (phases[done % 4], int(rng.integers(1, 4))), rng)
        cleaned += sum("left by an interrupted save" in line for line in lines)
        if not killed:  # finished before the chosen moment: check it, then a new round
            finish(out, uninterrupted)
            round_ += 1
            out = tmp_path / f"round{round_}"
            continue
        done += 1
        temporaries_seen += any(p.name.startswith(".") for p in out.iterdir()) if out.exists() else 0
        progress.append(check_consistent(out))
    _, lines = run_child(out, (out / "checkpoint.npz").exists())  # to the end, unhurried
    cleaned += sum("left by an interrupted save" in line for line in lines)
    finish(out, uninterrupted)
    return progress, temporaries_seen, cleaned


def finish(out, uninterrupted):
    """The run ended: same metrics, epoch by epoch, as the uninterrupted run; no temporaries left."""
    assert check_consistent(out) == KILL_RUN["epochs"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row, ref in zip(rows, uninterrupted):
        for key in ("train_loss", "pixel_acc", "mean_iu", "lr"):
            assert row[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-9), (row["epoch"], key)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_sigkill_at_random_moments_then_resume(tmp_path, uninterrupted):
    """20 SIGKILLs (5 each during a step, a save, a finished-but-unrenamed save and an evaluation):
    after each the checkpoint loads, is finite and agrees with metrics.jsonl; each resumed run ends
    with the uninterrupted run's metrics; temporaries left by killed saves are removed."""
    progress, temporaries_seen, cleaned = kill_and_resume(tmp_path, uninterrupted, kills=20, seed=0)
    assert len(progress) == 20
    assert temporaries_seen >= 1 and cleaned >= temporaries_seen  # the case arose, and was cleaned up
    assert max(progress) >= 2  # the kills landed in several epochs, not only before the first checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_many_more_times(tmp_path, uninterrupted, seed):
    kill_and_resume(tmp_path, uninterrupted, kills=40, seed=seed)


def test_float64_training_and_its_checkpoint(tmp_path):
    """dtype='float64': the model trains in float64, its checkpoint rebuilds a float64 model, and evaluation
    and prediction cast the float32 images to it; an unknown dtype is refused."""
    from minifcn.train import evaluate, predict_labels  # noqa: PLC0415

    cfg = tiny_fcn(tmp_path, model="encoder-decoder", width=1 / 16, image_size=16, epochs=1, dropout=0.0,
                   dtype="float64")
    history = train(cfg, log=lambda *a: None)
    assert math.isfinite(history[0]["train_loss"])
    model, meta = load_model(tmp_path / "checkpoint.npz")
    assert meta["config"]["dtype"] == "float64"
    assert {p.dtype for p in model.parameters()} == {np.dtype(np.float64)}
    val = get_dataset("shapes", split="val", num_images=2, image_size=16, seed=cfg.seed)
    loader = train_module.DataLoader(val, 1, mean=train_module.IMAGENET_MEAN_RGB, scale=cfg.input_scale)
    scores = evaluate(model, loader, val.num_classes)
    assert scores["pixel_acc"] == pytest.approx(history[0]["pixel_acc"])
    assert predict_labels(model, next(iter(loader))[0]).shape == (1, 16, 16)
    with pytest.raises(ValueError, match="dtype must be one of float32, float64, got 'float16'"):
        train(tiny_fcn(tmp_path / "bad", dtype="float16"), log=lambda *a: None)


class _TwinRanks:
    """Rank 0 of two ranks that hold the same numbers (the loss's sums double, means stay), recording each
    exchange. Built on SingleProcess so that every other operation stays the identity."""

    def __new__(cls):
        from minifcn.distributed import SingleProcess, _GradientAverager  # noqa: PLC0415

        class TwinRanks(SingleProcess):
            size, calls = 2, None

            def allreduce_sum(self, array):
                self.calls.append(("sum", np.size(array)))
                return 2 * np.array(array, dtype=np.asarray(array).dtype, copy=True)

            def allreduce_sum_(self, array):  # the scores and the preview: this rank's own
                self.calls.append(("sum_", array.size))
                return array

            def allreduce_mean_(self, array):
                self.calls.append(("mean", array.size))
                return array

            def allreduce_mean_and_sum_(self, array, extra):
                self.calls.append(("mean+sum", array.size))
                return 2 * np.asarray(extra, dtype=np.float64)

            def gradient_averager(self, params, route="buckets", bucket_bytes=64 << 20):
                return _GradientAverager(self, params, route, bucket_bytes)

        comm = TwinRanks()
        comm.calls = []
        return comm


def test_a_step_on_several_ranks_is_one_exchange_with_its_loss_and_the_next_count(tmp_path):
    """The ranks exchange once a step: the gradients, with the step's loss and the next step's pixel count
    in the same exchange (two barriers under load, not four); one more sum of a count opens each epoch."""
    comm = _TwinRanks()
    cfg = tiny_fcn(tmp_path / "run", batch_size=1, epochs=2)
    history = train(cfg, log=lambda *a: None, comm=comm)
    steps = 2 * 4 // 2  # 2 epochs of 4 images on 2 ranks of batch 1
    assert sum(c[0] == "mean+sum" for c in comm.calls) == steps
    assert not [c for c in comm.calls if c[0] == "mean"]  # the small FCN's gradients: one bucket
    assert sum(c == ("sum", 1) for c in comm.calls) == 2  # the first count of each epoch
    assert all(math.isfinite(loss) and loss > 0 for row in history for loss in row["step_loss"])
