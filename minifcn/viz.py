"""Pictures with Pillow only: label colours, overlays, prediction grids, training curves.

Every PNG is written atomically (:func:`save_png`), so a viewer or a crashed
run never sees half a file.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_write
from .backend import to_numpy

IGNORE_LABEL = 255
TILE = 192  # target size in pixels of the longer side of a grid tile
_LINE_COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189))
_PRETTY = {"train_loss": "train loss", "val_loss": "val loss", "mean_iu": "mean IU", "pixel_acc": "pixel acc",
           "mean_acc": "mean acc", "fwiu": "fw IU", "lr": "learning rate"}


def _font(size: int = 13):
    """Pillow's default font at ``size`` px (the bitmap default where FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


def voc_palette(n: int = 256) -> np.ndarray:
    """The Pascal VOC colour map: uint8 (n, 3).

    Class k's colour spreads the bits of k over the channels, most significant
    first: 0 black, 1 (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ...
    and 255 (ignore) the cream (224, 224, 192) of VOC's boundaries.
    """
    ids = np.arange(n)
    palette = np.zeros((n, 3), np.int64)
    for j in range(8):
        for ch in range(3):
            palette[:, ch] |= ((ids >> (3 * j + ch)) & 1) << (7 - j)
    return palette.astype(np.uint8)


def colorize(label, palette=None) -> np.ndarray:
    """Label (H, W) of class indices 0..255 -> uint8 (H, W, 3) colours (VOC palette by default)."""
    label = to_numpy(label)
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f"colorize: label values must be in 0..255, got {int(label.min())}..{int(label.max())}")
    palette = voc_palette() if palette is None else np.asarray(palette, np.uint8)
    return palette[label.astype(np.intp)]


def overlay(image, label, alpha: float = 0.5, background: int = 0) -> np.ndarray:
    """Blend the label colours into the image, leaving ``background`` pixels untouched.

    Inputs: image uint8 (H, W, 3); label (H, W). Returns uint8 (H, W, 3).
    """
    image, label = to_numpy(image), to_numpy(label)
    if image.shape[:2] != label.shape:
        raise ValueError(f"overlay: image {image.shape} and label {label.shape} differ in size")
    blended = (1 - alpha) * image + alpha * colorize(label).astype(np.float64)
    out = np.where((label == background)[..., None], image, blended)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


PNG_COMPRESS_LEVEL = 3  # zlib level of save_png (PIL's default: 6)


def save_png(array, path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array (or a PIL image) to ``path`` as PNG, atomically.

    The PNG is written to a temporary file in the same folder, then renamed over
    ``path`` with ``os.replace``. Missing parent folders are created.
    """
    image = array if isinstance(array, Image.Image) else Image.fromarray(np.asarray(to_numpy(array), np.uint8))
    # A fast zlib level: training writes its pictures every epoch, while rank 0's partners wait; the
    # files come out a little larger than at PIL's default level (benchmarks/RESULTS.md).
    atomic_write(path, lambda f: image.save(f, format="PNG", compress_level=PNG_COMPRESS_LEVEL))


# --------------------------------------------------------------------------- prediction grid

def _tile_size(h: int, w: int, scale) -> tuple[int, int]:
    """(h, w) of a tile: ``scale`` times the image, or by default an integer
    upscale (64 px -> 192 px) of small images and a downscale of large ones to TILE px."""
    if scale is None:
        f = TILE / max(h, w)
        scale = max(1, round(f)) if f >= 1 else f
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(array, size, nearest: bool):
    h, w = size
    if array.shape[:2] == (h, w):
        return np.asarray(array)
    resample = Image.NEAREST if nearest or h >= array.shape[0] else Image.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((w, h), resample))


def prediction_grid(images, labels, preds, path, class_names=None, scale=None, alpha: float = 0.5) -> None:
    """Save a PNG with one row per sample: image | ground truth | prediction | overlay.

    Inputs: images: N uint8 (H, W, 3) RGB arrays (an (N, H, W, 3) array or a list;
    sizes may differ); labels: N (H, W) label arrays or None (column left out);
    preds: N (H, W) predicted labels. class_names: legend names of classes
    0..C-1 (default: the classes present, by number). scale: tile magnification
    (default: about TILE px, nearest-neighbour, so 64 px images become 192 px).
    """
    images = [to_numpy(a) for a in images]
    preds = [to_numpy(a) for a in preds]
    labels = None if labels is None else [to_numpy(a) for a in labels]
    if len(preds) != len(images) or (labels is not None and len(labels) != len(images)):
        raise ValueError(f"prediction_grid: {len(images)} images, {len(preds)} preds, "
                         f"{'no' if labels is None else len(labels)} labels: counts must match")
    columns = ["image"] + (["ground truth"] if labels is not None else []) + ["prediction", "overlay"]
    rows = []
    for k, (image, pred) in enumerate(zip(images, preds)):
        size = _tile_size(*image.shape[:2], scale)
        tiles = [_resize(image, size, nearest=False)]
        if labels is not None:
            tiles.append(_resize(colorize(labels[k]), size, nearest=True))
        tiles += [_resize(colorize(pred), size, nearest=True), _resize(overlay(image, pred, alpha), size, False)]
        rows.append(tiles)

    font, pad, swatch = _font(14), 8, 14
    cell_w = max(t.shape[1] for r in rows for t in r)
    heights = [max(t.shape[0] for t in r) for r in rows]
    header_h = 24
    width = pad + len(columns) * (cell_w + pad)

    # Legend entries: every named class, or the classes present; 255 as 'ignore' if present.
    present = np.unique(np.concatenate([np.unique(a) for a in preds + (labels or [])]))
    if class_names is not None:
        entries = [(k, str(n)) for k, n in enumerate(class_names)]
    else:
        entries = [(int(k), f"class {int(k)}") for k in present if k != IGNORE_LABEL]
    if IGNORE_LABEL in present:
        entries.append((IGNORE_LABEL, "ignore"))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [swatch + 6 + int(probe.textlength(name, font=font)) + 16 for _, name in entries]
    lines, x = 1, pad
    for w in widths:
        if x + w > width - pad and x > pad:
            lines, x = lines + 1, pad
        x += w
    legend_h = lines * (swatch + 8) + pad
    height = header_h + sum(h + pad for h in heights) + legend_h

    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(columns):
        x0 = pad + c * (cell_w + pad)
        tw = draw.textlength(title, font=font)
        draw.text((x0 + (cell_w - tw) / 2, 5), title, fill=(0, 0, 0), font=font)
    y = header_h
    for tiles, h in zip(rows, heights):
        for c, tile in enumerate(tiles):
            x0 = pad + c * (cell_w + pad) + (cell_w - tile.shape[1]) // 2
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (x0, y + (h - tile.shape[0]) // 2))
        y += h + pad
    palette = voc_palette()
    x = pad
    for (k, name), w in zip(entries, widths):
        if x + w > width - pad and x > pad:
            x, y = pad, y + swatch + 8
        draw.rectangle([x, y, x + swatch - 1, y + swatch - 1], fill=tuple(int(v) for v in palette[k]),
                       outline=(0, 0, 0))
        draw.text((x + swatch + 6, y), name, fill=(0, 0, 0), font=font)
        x += w
    save_png(canvas, path)


# --------------------------------------------------------------------------- curves

def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1-2-5 step giving about ``ticks`` intervals over ``span``."""
    raw = span / ticks
    base = 10 ** math.floor(math.log10(raw))
    return next(m * base for m in (1, 2, 5, 10) if m * base >= raw)


def _axis(values) -> tuple[float, float, list[float]]:
    """Axis limits and tick positions covering ``values``."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        half = max(abs(lo) * 0.1, 0.5 if float(lo).is_integer() else 0.05)
        lo, hi = lo - half, hi + half
    step = _nice_step(hi - lo)
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    ticks = [lo + k * step for k in range(int(round((hi - lo) / step)) + 1)]
    return lo, hi, ticks


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _finite(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(v)


def _panel(draw, box, series, title, xlabel, font, small, colours=_LINE_COLOURS):
    """Draw one line chart in ``box`` = (x0, y0, x1, y1): ``series`` is [(name, [(x, y), ...]), ...],
    drawn in ``colours`` (one per series, in order; a series named '' gets no legend entry)."""
    bx0, by0, bx1, by1 = box
    left, right, top, bottom = bx0 + 58, bx1 - 14, by0 + 46, by1 - 38
    tw = draw.textlength(title, font=font)
    draw.text(((bx0 + bx1 - tw) / 2, by0 + 6), title, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    points = [p for _, pts in series for p in pts]
    if not points:
        msg = "no data"
        draw.text(((left + right - draw.textlength(msg, font=font)) / 2, (top + bottom) / 2 - 7), msg,
                  fill=(128, 128, 128), font=font)
        return
    x0, x1, xticks = _axis([p[0] for p in points])
    y0, y1, yticks = _axis([p[1] for p in points])

    def to_px(x, y):  # 6 px inside the frame, so markers at the limits stay visible
        return (left + 6 + (x - x0) / (x1 - x0) * (right - left - 12),
                bottom - 6 - (y - y0) / (y1 - y0) * (bottom - top - 12))

    for t in yticks:
        _, py = to_px(x0, t)
        draw.line([left, py, right, py], fill=(225, 225, 225))
        draw.line([left - 4, py, left, py], fill=(0, 0, 0))
        label = _fmt(t)
        draw.text((left - 7 - draw.textlength(label, font=small), py - 6), label, fill=(0, 0, 0), font=small)
    for t in xticks:
        px, _ = to_px(t, y0)
        draw.line([px, bottom, px, bottom + 4], fill=(0, 0, 0))
        label = _fmt(t)
        draw.text((px - draw.textlength(label, font=small) / 2, bottom + 6), label, fill=(0, 0, 0), font=small)
    draw.text(((left + right - draw.textlength(xlabel, font=small)) / 2, bottom + 21), xlabel,
              fill=(0, 0, 0), font=small)
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))

    lx = right
    for k, (name, pts) in reversed(list(enumerate(series))):  # legend, right-aligned above the plot
        colour = colours[k % len(colours)]
        if name:
            lx -= draw.textlength(name, font=small) + 28
            draw.line([lx, top - 11, lx + 18, top - 11], fill=colour, width=3)
            draw.text((lx + 22, top - 18), name, fill=(0, 0, 0), font=small)
    for k, (name, pts) in enumerate(series):  # lines in order: a later series is drawn over an earlier one
        colour = colours[k % len(colours)]
        xy = [to_px(x, y) for x, y in pts]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for px, py in xy if len(xy) <= 60 else []:  # markers, unless they would hide the line
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=colour)


def plot_curves(history, path, keys=(("train_loss",), ("mean_iu", "pixel_acc")), x: str = "epoch") -> None:
    """Save a PNG of line charts, one panel per group of ``keys``.

    Inputs: history: list of dicts (the rows of metrics.jsonl, e.g.
    ``{"epoch": 3, "train_loss": 0.41, "mean_iu": 0.72, "pixel_acc": 0.93}``);
    keys: one tuple of keys per panel (a bare string is a one-key panel);
    x: the key giving each row's x position (a row without it uses its index).
    Rows missing a key, or holding None/NaN/inf there, are skipped.
    """
    panels = [(k,) if isinstance(k, str) else tuple(k) for k in keys]
    font, small = _font(15), _font(12)
    pw, ph = 460, 320
    canvas = Image.new("RGB", (pw * len(panels), ph), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for p, panel in enumerate(panels):
        series = []
        for key in panel:
            pts = [(float(row.get(x, i)), float(row[key])) for i, row in enumerate(history)
                   if _finite(row.get(key)) and _finite(row.get(x, i))]
            series.append((_PRETTY.get(key, key), pts))
        title = ", ".join(name for name, _ in series)
        _panel(draw, (p * pw, 0, (p + 1) * pw, ph), series, title, x, font, small)
    save_png(canvas, path)


def smooth(values, window: int):
    """Trailing moving average: point i is the mean of values[max(0, i - window + 1) .. i]."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    c = np.concatenate([[0.0], np.cumsum(v)])
    i = np.arange(1, v.size + 1)
    lo = np.maximum(0, i - max(1, int(window)))
    return (c[i] - c[lo]) / (i - lo)


def plot_training(history, path, scores=("mean_iu", "pixel_acc")) -> None:
    """Save loss.png: the training loss of every step (light) and smoothed (dark) against the step, beside
    the held-out scores after each epoch.

    Inputs: history: the rows of metrics.jsonl; each row's ``step_loss`` (the loss of each of that epoch's
    steps) makes the left panel, falling back to ``train_loss`` per epoch for rows without it; ``scores``
    the held-out keys of the right panel. The smoothing window is 1/25 of the steps (at least 1).
    """
    steps = [float(v) for row in history for v in (row.get("step_loss") or []) if _finite(v)]
    font, small = _font(15), _font(12)
    pw, ph = 460, 320
    canvas = Image.new("RGB", (2 * pw, ph), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if steps:
        window = max(1, len(steps) // 25)
        raw = list(enumerate(steps, 1))
        smoothed = list(zip(range(1, len(steps) + 1), smooth(steps, window).tolist()))
        series = [("", raw), (f"mean of {window} steps" if window > 1 else "per step", smoothed)]
        _panel(draw, (0, 0, pw, ph), series, "training loss per step", "step", font, small,
               colours=((190, 205, 225), _LINE_COLOURS[0]))
    else:
        pts = [(float(row.get("epoch", i)), float(row["train_loss"])) for i, row in enumerate(history)
               if _finite(row.get("train_loss"))]
        _panel(draw, (0, 0, pw, ph), [("train loss", pts)], "training loss per epoch", "epoch", font, small)
    series = [(_PRETTY.get(k, k), [(float(row.get("epoch", i)), float(row[k])) for i, row in enumerate(history)
                                   if _finite(row.get(k))]) for k in scores]
    _panel(draw, (pw, 0, 2 * pw, ph), series, "held-out split, after each epoch", "epoch", font, small,
           colours=_LINE_COLOURS[1:])
    save_png(canvas, path)
