"""FCN-32s/16s/8s/8s-at-once (minifcn/models/fcn.py): parameter counts of the
paper's network, the reference initialisation, the crop offsets, and a
whole-model gradient check of the skip wiring."""
from __future__ import annotations

import types

import numpy as np
import pytest

import minifcn.layers.conv as conv_module
import minifcn.models.vgg as vgg_module
import minifcn.module as module_module
from minifcn import routes
from minifcn.backend import to_device, to_numpy
from minifcn.gradcheck import check_layer
from minifcn.layers import ConvTranspose2d, Crop, Scale, bilinear_kernel, upsample_filt
from minifcn.models import MODELS, EncoderDecoder, FCN8s, FCN8sAtOnce, FCN16s, FCN32s, build_model

VARIANTS = {"fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s, "fcn8s-atonce": FCN8sAtOnce}
TINY = 1 / 64
VGG_CONVS = [f"conv{s}_{i}" for s, n in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)) for i in range(1, n + 1)]


def zero_weights(mp):
    """Make building a width-1.0 model cheap: zero initial weights (``np.zeros`` maps pages lazily,
    where drawing random numbers and ``zeros_like`` write every one of the 540 MB). Counts and
    shapes do not depend on the values; the score layers and bilinear kernels are still set by
    the models' own code."""
    lazy = type("LazyZeros", (), {"zeros_like": staticmethod(lambda a: np.zeros(a.shape, a.dtype))})
    mp.setattr(conv_module, "_uniform_init", lambda shape, fan_in, dtype, rng: np.zeros(shape, dtype))
    mp.setattr(vgg_module, "he_init", lambda conv, rng: conv)
    mp.setattr(module_module, "get_array_module", lambda *arrays: lazy)


@pytest.fixture(scope="module")
def full_width():
    """fixed / learned-2x-upsampling variants at width 1.0, 21 classes."""
    with pytest.MonkeyPatch.context() as mp:
        zero_weights(mp)
        models = {name: cls(num_classes=21, width=1.0) for name, cls in VARIANTS.items()}
        models.update({f"{name}-learn": cls(num_classes=21, width=1.0, learn_upsampling=True)
                       for name, cls in VARIANTS.items() if name != "fcn8s-atonce"})
        return models


# -- parameter counts ------------------------------------------------------------------------

REFERENCE_COUNTS = {  # FCN_FACTS.md: (learnable, including the fixed transposed convolutions)
    "fcn32s": (134_346_581, 136_152_917),
    "fcn16s": (134_357_354, 134_815_994),
    "fcn8s": (134_362_751, 134_489_759),
    "fcn8s-atonce": (134_362_751, 134_489_759),  # the scales are constants, not parameters
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_match_the_reference(full_width, name):
    model = full_width[name]
    assert (model.num_parameters(trainable_only=True), model.num_parameters()) == REFERENCE_COUNTS[name]


def test_vgg16_conv_part_has_14714688_parameters(full_width):
    params = dict(full_width["fcn8s"].named_parameters())
    assert sum(params[f"{c}.{k}"].size for c in VGG_CONVS for k in ("weight", "bias")) == 14_714_688


@pytest.mark.parametrize("name, learned, fixed", [
    ("fcn32s", [], ["upscore"]),
    ("fcn16s", ["upscore2"], ["upscore16"]),
    ("fcn8s", ["upscore2", "upscore_pool4"], ["upscore8"]),
])
def test_learn_upsampling_makes_only_the_2x_upsamplers_trainable(full_width, name, learned, fixed):
    plain, learn = full_width[name], full_width[f"{name}-learn"]
    kernel_2x = 21 * 21 * 4 * 4  # ConvTranspose2d(21, 21, 4, stride 2), no bias
    assert learn.num_parameters(True) == plain.num_parameters(True) + len(learned) * kernel_2x
    assert learn.num_parameters() == plain.num_parameters()
    for layer in learned:
        assert getattr(learn, layer).weight.trainable and not getattr(plain, layer).weight.trainable
    for layer in fixed:
        assert not getattr(learn, layer).weight.trainable
    ups = sorted(n for n, m in learn.named_children() if isinstance(m, ConvTranspose2d))
    assert ups == sorted(learned + fixed)
    assert all(getattr(learn, n).bias is None for n in ups)  # transposed convolutions have no bias


# -- initialisation ------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_score_layers_start_at_zero(name):
    model = VARIANTS[name](num_classes=4, width=TINY, seed=3)
    scores = [n for n, _ in model.named_children() if n.startswith("score_") and not n.endswith("c")]
    assert scores == {"fcn32s": ["score_fr"], "fcn16s": ["score_fr", "score_pool4"]}.get(
        name, ["score_fr", "score_pool4", "score_pool3"])
    for layer in scores:
        conv = getattr(model, layer)
        assert conv.kernel_size == (1, 1)
        assert not conv.weight.data.any() and not conv.bias.data.any(), layer
    # so the first output is exactly zero whatever the input
    model.eval()
    y = model(np.random.default_rng(0).standard_normal((1, 3, 20, 17)).astype(np.float32))
    assert y.shape == (1, 4, 20, 17) and not y.any()
    # while the backbone is not zero (He initialisation)
    assert model.conv1_1.weight.data.std() > 0.1


@pytest.mark.parametrize("name", list(VARIANTS))
def test_upsampling_kernels_are_channel_diagonal_bilinear(name):
    c = 3
    model = VARIANTS[name](num_classes=c, width=TINY, learn_upsampling=True)
    factors = {"upscore": 32, "upscore2": 2, "upscore_pool4": 2, "upscore16": 16, "upscore8": 8}
    ups = [n for n, m in model.named_children() if isinstance(m, ConvTranspose2d)]
    assert ups
    for layer in ups:
        up, s = getattr(model, layer), factors[layer]
        assert (up.kernel_size, up.stride, up.padding) == ((2 * s, 2 * s), (s, s), (0, 0)), layer
        w = up.weight.data
        np.testing.assert_array_equal(w, bilinear_kernel(c, c, 2 * s))
        filt = upsample_filt(2 * s)
        for i in range(c):
            for j in range(c):
                np.testing.assert_allclose(w[i, j], filt if i == j else 0.0, rtol=0, atol=1e-7)
    if "upscore2" in ups:
        # hand-worked k = 4: f = 2, centre 1.5, 1-D weights 1 - |i - 1.5| / 2 = [0.25, 0.75, 0.75, 0.25]
        np.testing.assert_allclose(model.upscore2.weight.data[0, 0, 0], [0.0625, 0.1875, 0.1875, 0.0625])
        np.testing.assert_allclose(model.upscore2.weight.data[1, 1, 1], [0.1875, 0.5625, 0.5625, 0.1875])


def test_fixed_bilinear_upsampling_interpolates_a_constant_map():
    """Away from the borders a fixed bilinear 2x kernel maps a constant to the same constant
    (each output sums a 2x2 set of taps whose weights sum to 1)."""
    model = FCN16s(num_classes=2, width=TINY)
    x = np.full((1, 2, 5, 5), 3.0, np.float32)
    y = model.upscore2(x)
    assert y.shape == (1, 2, 12, 12)
    np.testing.assert_allclose(y[:, :, 2:-2, 2:-2], 3.0, rtol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_biases_learn_at_twice_the_rate_without_decay(name):
    model = VARIANTS[name](num_classes=3, width=TINY)
    params = list(model.named_parameters())
    biases = [(n, p) for n, p in params if n.endswith(".bias")]
    assert len(biases) == 15 + (1, 2, 3, 3)[list(VARIANTS).index(name)]  # 13 convs + fc6 + fc7 + score layers
    for n, p in params:
        want = (2.0, 0.0) if n.endswith(".bias") else (1.0, 1.0)
        assert (p.lr_mult, p.decay_mult) == want, n


def test_at_once_scales_pool4_and_pool3():
    model = FCN8sAtOnce(num_classes=3, width=TINY)
    assert isinstance(model.scale_pool4, Scale) and model.scale_pool4.factor == 0.01
    assert isinstance(model.scale_pool3, Scale) and model.scale_pool3.factor == 0.0001
    assert not any(isinstance(m, Scale) for _, m in FCN8s(num_classes=3, width=TINY).named_children())


def test_at_once_scale_is_applied_before_the_score_layer():
    """With the same weights, FCN-8s at-once equals FCN-8s whose score_pool4 / score_pool3
    weights are multiplied by 0.01 / 0.0001 (the score layers are linear)."""
    rng = np.random.default_rng(5)
    plain, atonce = FCN8s(num_classes=3, width=TINY, dtype=np.float64), FCN8sAtOnce(num_classes=3, width=TINY, dtype=np.float64)
    for n, p in plain.named_parameters():
        p.data[...] = rng.standard_normal(p.shape) * (0.3 if n.startswith("score") or n.endswith("bias") else 1)
    atonce.load_state_dict(plain.state_dict())
    plain.score_pool4.weight.data *= 0.01
    plain.score_pool3.weight.data *= 0.0001
    plain.eval(), atonce.eval()
    x = rng.standard_normal((1, 3, 21, 19))
    np.testing.assert_allclose(atonce(x), plain(x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, offsets", [
    ("fcn32s", {"score": 19}),
    ("fcn16s", {"score_pool4c": 5, "score": 27}),
    ("fcn8s", {"score_pool4c": 5, "score_pool3c": 9, "score": 31}),
    ("fcn8s-atonce", {"score_pool4c": 5, "score_pool3c": 9, "score": 31}),
])
def test_crop_offsets(name, offsets):
    model = VARIANTS[name](num_classes=2, width=TINY)
    crops = {n: m.offset for n, m in model.named_children() if isinstance(m, Crop)}
    assert crops == {n: (o, o) for n, o in offsets.items()}


def test_build_model_and_errors():
    assert set(MODELS) == set(VARIANTS)
    assert type(build_model("fcn8s_atonce", num_classes=2, width=TINY)) is FCN8sAtOnce
    assert type(build_model("FCN16s", num_classes=2, width=TINY)) is FCN16s
    ed = build_model("encoder-decoder", num_classes=2, width=0.125)
    assert type(ed) is EncoderDecoder and ed.conv1.out_channels == 8
    with pytest.raises(ValueError, match="fcn64s"):
        build_model("fcn64s")
    with pytest.raises(ValueError, match="num_classes"):
        FCN8s(num_classes=0, width=TINY)
    with pytest.raises(ValueError, match="width"):
        FCN8s(width=0)
    model = FCN8s(num_classes=2, width=TINY)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float64"):
        model(np.zeros((1, 3, 8, 8), np.float64))


def test_same_seed_same_model_other_seed_other_model():
    a, b, c = (FCN8s(num_classes=2, width=TINY, seed=s) for s in (7, 7, 8))
    for (n, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data, err_msg=n)
    assert not np.array_equal(a.conv1_1.weight.data, c.conv1_1.weight.data)


# -- whole-model gradient check ------------------------------------------------------------
#
# Tolerance 1e-4, not the per-layer 1e-6: finite differences through a whole
# FCN (ReLU and max pooling over a pad-100 border) now and then straddle a
# point where the function is not differentiable: a pooling window whose two
# largest values are within eps of each other, or a unit within eps of ReLU's
# kink. Measured over seeds, that gives relative errors up to ~1e-3 on an
# unlucky seed and below ~1e-5 typically, whereas a wiring error (a skip branch whose
# gradient is dropped, a wrong crop offset in backward) gives errors of order 1;
# the power tests below show the check fails then. Every layer is checked on
# its own at 1e-6 in the layer tests.

GRAD_TOL = 1e-4
GRAD_SEEDS_FAST = [0, 1]
GRAD_SEEDS_SLOW = [2]


def randomised(model, seed):
    """Score layers and all biases random and nonzero: with zero biases every unit of the
    pad-100 border sits exactly on ReLU's kink, and zero score layers would hide the skips."""
    rng = np.random.default_rng(seed + 100)
    for n, p in model.named_parameters():
        if n.endswith(".bias") or n.startswith("score"):
            p.data[...] = rng.uniform(0.05, 0.5, p.shape) * rng.choice([-1.0, 1.0], p.shape)
    return model


def small_model(name, seed):
    return randomised(VARIANTS[name](num_classes=3, width=TINY, learn_upsampling=True, dtype=np.float64,
                                     seed=seed), seed)


def small_input(name, seed):
    return np.random.default_rng(seed).standard_normal((1, 3, 9, 7))


def model_gradcheck(model, x, seed, wrt=None):
    return check_layer(model, x, mode="random", eps=1e-6, tol=GRAD_TOL, num_directions=2, seed=seed, wrt=wrt)


@pytest.mark.parametrize("seed", GRAD_SEEDS_FAST + [pytest.param(s, marks=pytest.mark.slow) for s in GRAD_SEEDS_SLOW])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_model_gradcheck(name, seed):
    model = small_model(name, seed)
    report = model_gradcheck(model, small_input(name, seed), seed)
    checked = {t.name for t in report.tensors}
    trainable = {n for n, p in model.named_parameters() if p.trainable}
    assert checked == trainable | {"input"}  # every learnable tensor and the input
    assert {"upscore2.weight"} <= checked or name == "fcn32s"  # learn_upsampling=True
    assert "conv1_1.weight" in checked and "score_fr.weight" in checked
    assert report.passed, str(report)


def test_model_gradcheck_uses_dropout_masks():
    """Dropout is on (p=0.5) in the checks above: the checker replays the same mask each pass.
    Here: the masks really differ from identity, so the check covers Dropout.backward inside a model."""
    model = small_model("fcn8s", 0)
    x = small_input("fcn8s", 0)
    y1, y2 = model(x).copy(), model(x).copy()
    assert not np.allclose(y1, y2)  # two passes, two masks
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def patch_backward(layer, backward):
    """Replace one layer's backward by ``backward(self, dy)``, bound to the layer so that the
    deep copy made by ``check_layer`` calls it on the copied layer."""
    layer.backward = types.MethodType(backward, layer)


def forget_skip(self, dy):
    """A wiring bug in a skip fusion: the sum's backward forgets its second input (the skip branch)."""
    return dy, np.zeros_like(dy)


POWER_WRT = ["input", "conv1_1.weight", "conv3_1.bias"]  # a few tensors: enough to see the failure, fast


@pytest.mark.parametrize("name, fuse, branch", [
    ("fcn8s", "fuse_pool3", "score_pool3.weight"),
    ("fcn16s", "fuse_pool4", "score_pool4.weight"),
])
def test_model_gradcheck_catches_a_dropped_skip_branch(name, fuse, branch):
    model = small_model(name, 0)
    x = small_input(name, 0)
    wrt = POWER_WRT + [branch]
    assert model_gradcheck(model, x, 0, wrt).passed  # the intact model passes on these tensors
    patch_backward(getattr(model, fuse), forget_skip)
    report = model_gradcheck(model, x, 0, wrt)
    assert not report.passed
    assert report.max_rel_err > 1e-2
    errors = {t.name: t.max_rel_err for t in report.tensors}
    assert errors[branch] > 0.5  # its analytic gradient is 0, the numerical one is not
    assert errors["conv1_1.weight"] > 1e-2  # and the backbone misses the skip's share


def test_model_gradcheck_catches_a_dropped_pool3_gradient():
    """Another wiring bug: FCN-8s's backward forgets to add the pool3 skip's gradient into
    the backbone (d_pool3 holds only the deeper path's share)."""
    model = small_model("fcn8s", 0)

    def no_input_grad(self, dy):  # score_pool3's weight gradient is kept, its input gradient lost
        return type(self).backward(self, dy) * 0.0

    patch_backward(model.score_pool3, no_input_grad)
    report = model_gradcheck(model, small_input("fcn8s", 0), 0, POWER_WRT + ["score_pool3.weight"])
    errors = {t.name: t.max_rel_err for t in report.tensors}
    assert errors["score_pool3.weight"] < GRAD_TOL  # the branch's own parameters are still right
    assert not report.passed and errors["conv1_1.weight"] > 1e-2


@pytest.mark.parametrize("name", list(VARIANTS))
def test_batch_gradient_is_the_sum_of_per_image_gradients(name, batch_gradient_is_the_sum, device):
    """Backward of a batch of two equals the sum of the two batch-1 backwards (dropout off).
    Batch 1 and batch > 1 take different code paths in the convolutions (the reference trains
    with batch 1); a regression test for 1x1 input gradients that aliased a shared buffer at batch 1."""
    model = small_model(name, 4).to(device)
    model.eval()
    x = to_device(np.concatenate([small_input(name, 5), small_input(name, 6)]), device)
    g = to_device(np.random.default_rng(7).standard_normal(model(x).shape), device)
    batch_gradient_is_the_sum(model, x, g)


def test_threads_change_no_output_and_no_gradient_beyond_rounding(gradients, monkeypatch):
    """FCN-8s with every convolution cut into one-row bands shared by three threads, and
    ReLU and pooling cut into pieces (minifcn.parallel), against the same model on one thread."""
    from minifcn import parallel
    from minifcn.layers import columns
    monkeypatch.setitem(columns.BAND_BYTES, "numpy", 1)
    monkeypatch.setattr(columns, "MIN_COPY_BYTES", 1)
    monkeypatch.setattr(parallel, "MIN_PIECE_BYTES", 0)
    model = small_model("fcn8s", 4)
    model.eval()
    x = np.concatenate([small_input("fcn8s", 5), small_input("fcn8s", 6), small_input("fcn8s", 8)])
    g = np.random.default_rng(7).standard_normal(model(x).shape)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "1")
    y1 = model(x)
    dx1, one = gradients(model, x, g)
    monkeypatch.setenv("MINIFCN_NUM_THREADS", "3")
    np.testing.assert_array_equal(model(x), y1)
    dx3, three = gradients(model, x, g)
    np.testing.assert_allclose(dx3, dx1, rtol=1e-12, atol=1e-14)
    for n in one:
        np.testing.assert_allclose(three[n], one[n], rtol=1e-11, atol=1e-14, err_msg=n)


@pytest.mark.parametrize("name", ["fcn8s", "encoder-decoder"])
def test_input_grad_off_returns_none_and_the_same_parameter_gradients(name, gradients, device, monkeypatch):
    """Training sets model.input_grad = False: the first convolution skips its input
    gradient, and every parameter gradient is unchanged (FCN's to rounding: its other
    convolutions then take input gradients up to the runs its padding leaves, and do cut them)."""
    from minifcn.layers import conv_fast  # noqa: PLC0415

    cut = []
    monkeypatch.setattr(conv_fast, "put_lines", lambda *a, _f=conv_fast.put_lines: cut.append(1) or _f(*a))
    if name == "encoder-decoder":
        model = EncoderDecoder(num_classes=3, base_width=2, dtype=np.float64, seed=0)
        x = np.random.default_rng(5).standard_normal((2, 3, 16, 16))
    else:
        model = small_model(name, 4)
        x = small_input(name, 5)
    model.to(device).eval()
    x = to_device(x, device)
    g = to_device(np.random.default_rng(7).standard_normal(model(x).shape), device)
    assert model.input_grad is True
    dx, with_dx = gradients(model, x, g)
    assert dx.shape == x.shape
    model.input_grad = False
    none, without = gradients(model, x, g)
    assert none is None
    for n in with_dx:
        if name == "fcn8s":
            np.testing.assert_allclose(to_numpy(without[n]), to_numpy(with_dx[n]), rtol=1e-11, atol=1e-15,
                                       err_msg=n)
        else:
            np.testing.assert_array_equal(to_numpy(with_dx[n]), to_numpy(without[n]), err_msg=n)
    assert (len(cut) >= 3) == (name == "fcn8s" and routes.mode() == "fast"), cut  # (none on the textbook route)
    model.input_grad = True  # and back: every input gradient exact again
    assert all(not getattr(m, "input_grad_up_to_runs", False) for m in model.modules())


def test_two_models_forward_from_two_user_threads_equal_serial(monkeypatch):
    """Two FCN-8s of the same shape (different weights) run forward passes in two Python
    threads at once, several times, with every convolution cut into one-row bands: each result
    equals the same model run alone. Scratch buffers shared between user threads (keyed only by
    band worker, so both threads' worker 0 wrote the same columns) failed this."""
    import sys
    import threading

    from minifcn.layers import columns

    monkeypatch.setenv("MINIFCN_ROUTE", "fast")  # the bands and their buffers are the fast routes'
    monkeypatch.setitem(columns.BAND_BYTES, "numpy", 1)
    monkeypatch.setattr(columns, "MIN_COPY_BYTES", 1)
    models = [small_model("fcn8s", seed) for seed in (4, 5)]
    for m in models:
        m.eval()
    x = np.concatenate([small_input("fcn8s", 5), small_input("fcn8s", 6)])
    serial = [m(x).copy() for m in models]
    results, errors = [[], []], []

    def work(i):
        try:
            for _ in range(6):
                results[i].append(models[i](x).copy())
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # hand the GIL over often, as a busy machine would
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(switch)
    assert not errors, errors
    for i in (0, 1):
        assert len(results[i]) == 6
        for y in results[i]:
            np.testing.assert_array_equal(y, serial[i])

