"""Three ways to upsample: nearest, bilinear, and a bilinear-initialised transposed convolution, before and after learning.

Takes shapes images, average-pools them 4x, and upsamples them back 4x with
Upsample('nearest'), Upsample('bilinear') and ConvTranspose2d(k=8, s=4, p=2)
initialised with FCN's bilinear kernel; checks that the last two agree away
from a 2-pixel frame; then trains the transposed convolution with minifcn's SGD
to undo the pooling and compares the learned kernel with the bilinear one.
Writes upsampling.png into --out.

    python examples/upsampling_compare.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _figure as fig  # noqa: E402  (also makes minifcn importable from a checkout)
import numpy as np  # noqa: E402

from minifcn.data import ShapesDataset  # noqa: E402
from minifcn.layers import ConvTranspose2d, Upsample, bilinear_kernel, upsample_filt  # noqa: E402
from minifcn.optim import SGD  # noqa: E402

F = 4            # upsampling factor
SIDE = 64        # image side
INNER = (Ellipsis, slice(F, -F), slice(F, -F))  # errors are measured away from the zero-padded frame


def planes(split, n):
    """n shapes images as grey planes (3n, 1, SIDE, SIDE) in [0, 1], one plane per colour channel."""
    ds = ShapesDataset(split, n, SIDE)
    images = np.stack([ds[i][0] for i in range(n)]) / 255.0
    return np.moveaxis(images, -1, 1).reshape(-1, 1, SIDE, SIDE)


def avgpool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // F, F, w // F, F).mean(axis=(3, 5))


def transposed_bilinear():
    t = ConvTranspose2d(1, 1, 2 * F, stride=F, padding=F // 2, bias=False, dtype=np.float64)
    t.weight.data[...] = bilinear_kernel(1, 1, 2 * F, np.float64)
    return t


def mse(layer, images):
    return float(((layer(avgpool(images)) - images)[INNER] ** 2).mean())


def learn(train, steps, lr=5.0):
    """SGD on the mean squared error inside the frame, starting from the bilinear kernel."""
    up = transposed_bilinear()
    optimizer = SGD(up, lr=lr, momentum=0.9)
    small = avgpool(train)
    losses = []
    for _ in range(steps):
        up.zero_grad()
        out = up(small)
        residual = np.zeros_like(train)
        residual[INNER] = (out - train)[INNER]
        losses.append(float((residual[INNER] ** 2).mean()))
        up.backward(2 * residual / residual[INNER].size)
        optimizer.step()
    return up, losses


def rgb(planes_, index):
    """Planes of image ``index`` back to uint8 (H, W, 3)."""
    p = planes_[3 * index:3 * index + 3, 0]
    return (np.clip(np.moveaxis(p, 0, -1), 0, 1) * 255).round().astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and steps (for tests)")
    parser.add_argument("--out", default="runs/examples", help="folder for upsampling.png")
    parser.add_argument("--steps", type=int, default=None, help="SGD steps (default 300, quick 60)")
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    train, val = planes("train", 8 if args.quick else 32), planes("val", 4 if args.quick else 16)

    nearest, bilinear, tconv = Upsample(F, "nearest"), Upsample(F, "bilinear"), transposed_bilinear()
    small = avgpool(val)
    diff = np.abs(bilinear(small) - tconv(small))
    inside, frame = float(diff[INNER[0], F // 2:-(F // 2), F // 2:-(F // 2)].max()), float(diff.max())
    print(f"bilinear Upsample vs bilinear ConvTranspose2d(k={2 * F}, s={F}, p={F // 2}): "
          f"max |difference| {inside:.1e} inside, {frame:.3f} in the {F // 2}-pixel frame")

    learned, losses = learn(train, steps)
    errors = {"nearest": mse(nearest, val), "bilinear": mse(bilinear, val), "bilinear ConvTranspose2d": mse(tconv, val),
              "learned ConvTranspose2d": mse(learned, val)}
    print(f"training MSE {losses[0]:.5f} -> {losses[-1]:.5f} in {steps} steps")
    for name, e in errors.items():
        print(f"held-out MSE inside the frame, {name}: {e:.5f}")
    k_bil, k_learned = upsample_filt(2 * F), learned.weight.data[0, 0]
    p_bil, p_learned = k_bil.sum(axis=0) / F, k_learned.sum(axis=0) / F  # 1-D profiles (bilinear rows sum to F)
    print("bilinear kernel, 1-D profile:", np.round(p_bil, 3))
    print("learned kernel,  1-D profile:", np.round(p_learned, 3))

    # ---- figure
    index = 1
    tile = (192, 192)
    images = [rgb(val, index), rgb(small, index)] + [rgb(layer(small), index) for layer in (nearest, bilinear, tconv, learned)]
    row1 = [fig.enlarge(im, tile, nearest=True) for im in images]
    titles1 = ["original 64x64", "avg-pooled 16x16", "nearest x4", "bilinear x4\n(Upsample)",
               "bilinear x4\n(ConvTranspose2d)", f"learned x4\n({steps} SGD steps)"]
    d = diff[3 * index:3 * index + 3, 0].max(axis=0)
    vmax = max(float(np.abs(k_learned).max()), float(k_bil.max()))
    row2 = [fig.enlarge(fig.colormap(d, 0, max(d.max(), 1e-12)), tile),
            fig.enlarge(fig.colormap(k_bil, -vmax, vmax, diverging=True), (160, 160)),
            fig.enlarge(fig.colormap(k_learned, -vmax, vmax, diverging=True), (160, 160)),
            fig.line_plot([p_bil, p_learned, np.r_[np.zeros(F // 2), np.ones(F), np.zeros(F // 2)]],
                          size=(280, 190), title="1-D profiles (kernel summed over rows / 4)",
                          labels=["bilinear", "learned", "nearest"]),
            fig.line_plot([losses], size=(280, 190), title="training MSE per step")]
    titles2 = ["|Upsample - ConvTranspose2d|\n(bilinear; zero inside the frame)", "bilinear kernel 8x8",
               "learned kernel 8x8\n(red +, blue -)", "", ""]
    caption = (f"Held-out mean squared error inside the frame: nearest {errors['nearest']:.5f}, bilinear "
               f"{errors['bilinear']:.5f}, learned {errors['learned ConvTranspose2d']:.5f}.\n"
               f"The transposed convolution darkens a {F // 2}-pixel frame (zero padding); inside it equals bilinear "
               f"Upsample. Learning makes the kernel narrower than bilinear: the shapes have hard edges.")
    image = fig.stack([fig.compose([row1], titles=[titles1], title_h=36),
                       fig.compose([row2], titles=[titles2], title_h=36, caption=caption)])
    path = fig.save(image, args.out, "upsampling.png")
    print(f"wrote {path}")
    ok = inside < 1e-12 and errors["learned ConvTranspose2d"] < errors["bilinear ConvTranspose2d"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
