"""Small Pillow helpers shared by the example scripts: colour maps, labelled tiles, grids of numbers, line plots.

Not part of the minifcn package; the examples import it from their own folder.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:  # run from a checkout without `pip install -e .`
    import minifcn  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)

from minifcn.viz import save_png  # noqa: E402

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (120, 120, 120)
LINE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14))


def font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def colormap(values, lo=None, hi=None, diverging=False) -> np.ndarray:
    """Float (H, W) -> uint8 (H, W, 3). Sequential: dark blue -> teal -> yellow.
    Diverging (symmetric around 0): blue -> white -> red."""
    v = np.asarray(values, dtype=np.float64)
    if diverging:
        m = max(abs(lo if lo is not None else v.min()), abs(hi if hi is not None else v.max()), 1e-12)
        t = np.clip(v / m, -1, 1)
        neg, pos = np.array([33, 102, 172]), np.array([178, 24, 43])
        white = np.array([247, 247, 247])
        out = np.where(t[..., None] < 0, white + (-t[..., None]) * (neg - white), white + t[..., None] * (pos - white))
        return out.astype(np.uint8)
    lo = v.min() if lo is None else lo
    hi = v.max() if hi is None else hi
    t = np.clip((v - lo) / max(hi - lo, 1e-12), 0, 1)
    anchors = np.array([[38, 20, 90], [40, 90, 160], [30, 160, 140], [120, 200, 80], [250, 230, 40]], np.float64)
    pos = t * (len(anchors) - 1)
    i = np.minimum(pos.astype(int), len(anchors) - 2)
    f = (pos - i)[..., None]
    return (anchors[i] * (1 - f) + anchors[i + 1] * f).astype(np.uint8)


def enlarge(array, size, nearest=True) -> Image.Image:
    """uint8 (H, W) or (H, W, 3) -> a PIL image of size (w, h), nearest-neighbour by default."""
    image = Image.fromarray(np.ascontiguousarray(np.asarray(array, np.uint8)))
    return image.resize(size, Image.NEAREST if nearest else Image.BILINEAR)


def number_grid(values, cell=34, fmt=None, highlight=None, size=12) -> Image.Image:
    """A grid of numbers, one cell per entry; zeros drawn as '.'; ``highlight`` a boolean mask shaded blue."""
    values = np.asarray(values)
    h, w = values.shape
    image = Image.new("RGB", (w * cell + 1, h * cell + 1), WHITE)
    draw = ImageDraw.Draw(image)
    f = font(size)
    for (r, c), v in np.ndenumerate(values):
        box = [c * cell, r * cell, (c + 1) * cell, (r + 1) * cell]
        fill = (206, 224, 245) if highlight is not None and highlight[r, c] else WHITE
        draw.rectangle(box, fill=fill, outline=(170, 170, 170))
        text = "." if v == 0 else (fmt(v) if fmt else (f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"))
        tw = draw.textlength(text, font=f)
        draw.text((box[0] + (cell - tw) / 2, box[1] + (cell - size) / 2 - 1), text, fill=BLACK, font=f)
    return image


def line_plot(series, size=(220, 160), title="", ylim=None, labels=None) -> Image.Image:
    """A minimal line chart: ``series`` is a list of 1-D arrays (x = index)."""
    w, h = size
    image = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(image)
    f = font(11)
    left, right, top, bottom = 46, w - 8, 18 if title else 8, h - (30 if labels else 18)
    ys = np.concatenate([np.asarray(s, float) for s in series])
    lo, hi = (ys.min(), ys.max()) if ylim is None else ylim
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    draw.rectangle([left, top, right, bottom], outline=GREY)
    for frac in (0.0, 0.5, 1.0):
        yv = lo + pad + frac * (hi - lo - 2 * pad)
        py = bottom - (yv - lo) / (hi - lo) * (bottom - top)
        draw.line([left - 3, py, left, py], fill=GREY)
        label = f"{yv:.3g}"
        draw.text((left - 5 - draw.textlength(label, font=f), py - 6), label, fill=BLACK, font=f)
    if title:
        draw.text(((w - draw.textlength(title, font=f)) / 2, 2), title, fill=BLACK, font=f)
    for k, s in enumerate(series):
        s = np.asarray(s, float)
        n = max(len(s) - 1, 1)
        pts = [(left + 4 + i / n * (right - left - 8), bottom - (v - lo) / (hi - lo) * (bottom - top)) for i, v in enumerate(s)]
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        if len(pts) <= 40:
            for x, y in pts:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    if labels:
        x = left + 6
        for k, name in enumerate(labels):
            colour = LINE_COLOURS[k % len(LINE_COLOURS)]
            draw.line([x, bottom + 17, x + 12, bottom + 17], fill=colour, width=2)
            draw.text((x + 15, bottom + 10), name, fill=BLACK, font=f)
            x += 15 + draw.textlength(name, font=f) + 12
    return image


def wrap(text, width, size=13) -> str:
    """``text`` with its lines broken at spaces so that each fits in ``width`` pixels at font ``size``
    (a single word wider than that stays on its own line)."""
    f = font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    out = []
    for line in text.split("\n"):
        current = ""
        for word in line.split(" "):
            trial = f"{current} {word}" if current else word
            if current and probe.textlength(trial, font=f) > width:
                out.append(current)
                current = word
            else:
                current = trial
        out.append(current)
    return "\n".join(out)


def compose(rows, titles=None, row_titles=None, pad=10, title_h=30, caption=None, row_title_w=0) -> Image.Image:
    """Lay out a grid of PIL images (``rows``: lists; None leaves a gap) with titles above each tile.

    A title wider than its column is wrapped onto more lines (:func:`wrap`), and the title band grows
    to hold them, so neighbouring titles never overlap.
    """
    f = font(13)
    ncol = max(len(r) for r in rows)
    col_w = [max((r[c].width for r in rows if c < len(r) and r[c] is not None), default=0) for c in range(ncol)]
    if titles:
        titles = [[wrap(t, col_w[c] + pad - 2) if t else t for c, t in enumerate(r)] for r in titles]
        title_h = max([title_h] + [15 * (t.count("\n") + 1) + 4 for r in titles for t in r if t])
    row_h = [max((t.height for t in r if t is not None), default=0) for r in rows]
    width = row_title_w + pad + sum(w + pad for w in col_w)
    cap_h = 0
    if caption:
        cap_h = 18 * (caption.count("\n") + 1) + pad
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        width = max(width, 2 * pad + int(max(probe.textlength(line, font=font(12)) for line in caption.split("\n"))))
    height = pad + sum(h + title_h for h in row_h) + pad * (len(rows) - 1) + pad + cap_h
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r, row in enumerate(rows):
        x = row_title_w + pad
        if row_titles and row_titles[r]:
            for k, line in enumerate(row_titles[r].split("\n")):
                draw.text((pad, y + title_h + row_h[r] / 2 - 16 + 15 * k), line, fill=BLACK, font=f)
        for c, tile in enumerate(row):
            if tile is not None:
                title = titles[r][c] if titles and r < len(titles) and c < len(titles[r]) else ""
                for k, line in enumerate(title.split("\n") if title else []):
                    tw = draw.textlength(line, font=f)
                    draw.text((x + (col_w[c] - tw) / 2, y + title_h - 15 * (len(title.split("\n")) - k) - 2),
                              line, fill=BLACK, font=f)
                canvas.paste(tile, (x + (col_w[c] - tile.width) // 2, y + title_h))
            x += col_w[c] + pad
        y += title_h + row_h[r] + pad
    if caption:
        for k, line in enumerate(caption.split("\n")):
            draw.text((pad, y + 18 * k), line, fill=(60, 60, 60), font=font(12))
    return canvas


def legend(entries, width=None) -> Image.Image:
    """A one-line legend: ``entries`` is a list of (RGB colour, name)."""
    f = font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [14 + 5 + int(probe.textlength(name, font=f)) + 14 for _, name in entries]
    image = Image.new("RGB", (width or sum(widths) + 10, 20), WHITE)
    draw = ImageDraw.Draw(image)
    x = 8
    for (colour, name), w in zip(entries, widths):
        draw.rectangle([x, 3, x + 13, 16], fill=tuple(int(c) for c in colour), outline=BLACK)
        draw.text((x + 19, 3), name, fill=BLACK, font=f)
        x += w
    return image


def stack(images, pad=0) -> Image.Image:
    """Images one above the other, left-aligned, on white."""
    width = max(im.width for im in images)
    canvas = Image.new("RGB", (width, sum(im.height for im in images) + pad * (len(images) - 1)), WHITE)
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + pad
    return canvas


def save(image, out_dir, name) -> str:
    """Save ``image`` as ``out_dir/name`` (PNG, written atomically by minifcn.viz.save_png); return the path."""
    path = os.path.join(out_dir, name)
    save_png(image.convert("RGB"), path)
    return path
