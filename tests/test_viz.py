"""Palette, colouring, overlays and the PNGs of minifcn/viz.py."""
import math

import numpy as np
import pytest
from PIL import Image

from minifcn.data import ShapesDataset
from minifcn.viz import colorize, overlay, plot_curves, prediction_grid, save_png, voc_palette


def test_voc_palette_known_entries():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    expected = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
                5: (128, 0, 128), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    for k, rgb in expected.items():
        assert tuple(p[k]) == rgb, k
    assert len({tuple(c) for c in p[:21]}) == 21
    np.testing.assert_array_equal(voc_palette(21), p[:21])


def test_colorize_and_overlay():
    label = np.array([[0, 1], [2, 255]], np.uint8)
    colours = colorize(label)
    assert colours.shape == (2, 2, 3) and colours.dtype == np.uint8
    assert tuple(colours[0, 1]) == (128, 0, 0) and tuple(colours[1, 1]) == (224, 224, 192)
    with pytest.raises(ValueError, match="0..255"):
        colorize(np.array([[300]]))
    image = np.full((2, 2, 3), 100, np.uint8)
    out = overlay(image, label, alpha=0.5)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == (100, 100, 100)  # background untouched
    assert tuple(out[0, 1]) == (114, 50, 50)  # (100 + 128) / 2, (100 + 0) / 2
    with pytest.raises(ValueError):
        overlay(image, np.zeros((3, 2), np.uint8))


def test_prediction_grid_png(tmp_path):
    ds = ShapesDataset("val", num_images=3)
    images, labels = zip(*[ds[i] for i in range(3)])
    path = tmp_path / "grid.png"
    prediction_grid(images, labels, labels, path, class_names=ds.class_names)
    with Image.open(path) as im:
        w, h = im.size
        assert im.mode == "RGB"
        pixels = np.asarray(im)
    assert 4 * 192 <= w <= 4 * 192 + 100 and 3 * 192 <= h <= 3 * 192 + 150
    palette = voc_palette()
    for k in range(1, 6):  # every class colour painted somewhere (tiles and legend)
        assert (pixels == palette[k]).all(-1).any(), k


def test_prediction_grid_without_labels_and_mixed_sizes(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (300, 200, 3), dtype=np.uint8), rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)]
    preds = [np.full((300, 200), 255, np.uint8), np.ones((40, 50), np.uint8)]
    prediction_grid(images, None, preds, tmp_path / "g.png")
    with Image.open(tmp_path / "g.png") as im:
        w, h = im.size
    assert 3 * 150 <= w <= 3 * 220 and 2 * 150 <= h <= 2 * 220 + 100  # 300 px shrunk, 50 px enlarged
    with pytest.raises(ValueError, match="counts must match"):
        prediction_grid(images, None, preds[:1], tmp_path / "bad.png")


HISTORY = [{"epoch": e, "train_loss": 2.0 / e, "mean_iu": 0.1 * e, "pixel_acc": 0.5 + 0.05 * e} for e in range(1, 9)]


@pytest.mark.parametrize("history", [
    HISTORY,
    HISTORY[:1],
    [{**row, "mean_iu": math.nan} if row["epoch"] % 2 else row for row in HISTORY],
    [{"epoch": 1, "train_loss": math.nan, "mean_iu": None}],
    [],
], ids=["full", "single-point", "nan-values", "all-nan", "empty"])
def test_plot_curves_png(tmp_path, history):
    path = tmp_path / "curves.png"
    plot_curves(history, path)
    with Image.open(path) as im:
        assert im.size == (920, 320)
        pixels = np.asarray(im.convert("RGB"))
    assert (pixels < 100).all(-1).any()  # some dark text or axes were drawn


def test_plot_curves_draws_the_lines(tmp_path):
    plot_curves(HISTORY, tmp_path / "c.png", keys=["train_loss"])
    with Image.open(tmp_path / "c.png") as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    blue = (np.abs(pixels - (31, 119, 180)).sum(-1) < 30).sum()
    assert blue > 200  # line, markers and legend swatch


def test_save_png_is_atomic(tmp_path, monkeypatch):
    import os
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real_replace(a, b)))
    save_png(np.zeros((4, 5, 3), np.uint8), tmp_path / "sub/a.png")
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]
    (tmp, final), = renames  # written under another name in the same folder, then renamed
    assert os.path.dirname(tmp) == str(tmp_path / "sub") and tmp != final and final == str(tmp_path / "sub/a.png")
    with Image.open(tmp_path / "sub/a.png") as im:
        assert im.size == (5, 4)
    save_png(np.full((4, 5), 7, np.uint8), tmp_path / "sub/a.png")  # replaces the old file
    with Image.open(tmp_path / "sub/a.png") as im:
        assert im.mode == "L" and np.asarray(im)[0, 0] == 7
    with pytest.raises(OSError):
        save_png(Image.new("CMYK", (3, 3)), tmp_path / "sub/b.png")  # PNG cannot hold CMYK
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]  # no temp file, no b.png


def test_smooth_is_a_trailing_mean():
    from minifcn.viz import smooth  # noqa: PLC0415

    np.testing.assert_allclose(smooth([4, 2, 6, 0, 8], 2), [4, 3, 4, 3, 4])
    np.testing.assert_allclose(smooth([1, 2, 3], 1), [1, 2, 3])
    np.testing.assert_allclose(smooth([1, 2, 3, 4], 10), [1, 1.5, 2, 2.5])


def test_plot_training_steps_beside_held_out_scores(tmp_path):
    """Left: every step's loss (light) and its moving mean (dark blue) over the steps; right: the held-out
    scores per epoch in the other colours. Rows without step_loss fall back to one point per epoch."""
    from minifcn.viz import plot_training  # noqa: PLC0415

    rng = np.random.default_rng(0)
    history = [{**row, "step_loss": (row["train_loss"] + 0.3 * rng.standard_normal(100)).tolist()} for row in HISTORY]
    plot_training(history, tmp_path / "loss.png")
    with Image.open(tmp_path / "loss.png") as im:
        assert im.size == (920, 320)
        pixels = np.asarray(im.convert("RGB")).astype(int)

    def count(colour, half):
        part = pixels[:, :460] if half == "left" else pixels[:, 460:]
        return int((np.abs(part - colour).sum(-1) < 20).sum())

    assert count((190, 205, 225), "left") > 1000        # the raw per-step loss: many points, noisy
    assert count((31, 119, 180), "left") > 150          # the smoothed line
    assert count((31, 119, 180), "right") == 0          # the scores are not drawn in the loss's colour
    assert count((255, 127, 14), "right") > 100 and count((44, 160, 44), "right") > 100
    plot_training(HISTORY, tmp_path / "per_epoch.png")  # no step_loss: the per-epoch mean
    with Image.open(tmp_path / "per_epoch.png") as im:
        left = np.asarray(im.convert("RGB")).astype(int)[:, :460]
    assert (np.abs(left - (31, 119, 180)).sum(-1) < 20).sum() > 50
