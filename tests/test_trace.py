"""Blob shapes of FCN-32s/16s/8s: the shape trace (minifcn/models/trace.py)
against the closed forms of the reference and against real forward passes.

The closed forms, for an input side H (FCN_FACTS.md): F = ceil((H + 6) / 32)
is the side of fc6 and score_fr; upscore2 = 2F + 2; upscore_pool4 = 4F + 6;
upscore (32s) = 32F + 32; upscore16 = 32F + 48; upscore8 = 32F + 56; and
after the last crop the output is exactly H.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import minifcn.layers.conv as conv_module
import minifcn.module as module_module
import minifcn.models.vgg as vgg_module
from minifcn.models import FCN8s, FCN8sAtOnce, FCN16s, FCN32s
from minifcn.models.trace import fcn_blobs

VARIANTS = {"fcn32s": FCN32s, "fcn16s": FCN16s, "fcn8s": FCN8s, "fcn8s-atonce": FCN8sAtOnce}
TINY = 1 / 64  # 1, 2, 4, 8, 8 backbone channels and 64 in fc6/fc7: a real forward pass in milliseconds


@pytest.fixture(scope="module")
def full_width():
    """The four variants at width 1.0 (21 classes), built with zero weights.

    Shapes do not depend on weight values; drawing 134 M random numbers would
    take seconds per model, so the initialisers are replaced by zeros here.
    """
    with pytest.MonkeyPatch.context() as mp:
        zero_weights(mp)
        return {name: cls(num_classes=21, width=1.0) for name, cls in VARIANTS.items()}


def zero_weights(mp):
    """Make building a width-1.0 model cheap: zero initial weights (``np.zeros`` maps pages lazily,
    where drawing random numbers and ``zeros_like`` write every one of the 540 MB)."""
    lazy = type("LazyZeros", (), {"zeros_like": staticmethod(lambda a: np.zeros(a.shape, a.dtype))})
    mp.setattr(conv_module, "_uniform_init", lambda shape, fan_in, dtype, rng: np.zeros(shape, dtype))
    mp.setattr(vgg_module, "he_init", lambda conv, rng: conv)
    mp.setattr(module_module, "get_array_module", lambda *arrays: lazy)


def closed_forms(h: int) -> dict:
    """The reference's sizes for an input side ``h``, written out independently of the code:
    conv1_1 (pad 100, k 3) gives h + 198; each pool halves rounding up; fc6 (k 7) removes 6."""
    f = math.ceil((h + 6) / 32)
    pools, side = [], h + 198
    for _ in range(5):
        side = -(-side // 2)
        pools.append(side)
    return {"F": f, "pools": pools, "fc6": pools[-1] - 6, "upscore2": 2 * f + 2, "upscore_pool4": 4 * f + 6,
            "upscore": 32 * f + 32, "upscore16": 32 * f + 48, "upscore8": 32 * f + 56}


def shapes_by_name(model, h, w=None):
    return {b.name: b.shape for b in fcn_blobs(model, h, w)}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_closed_form_sizes_for_every_side_1_to_1000(full_width, name):
    model = full_width[name]
    for h in range(1, 1001):
        s = shapes_by_name(model, h)
        want = closed_forms(h)
        f = want["F"]
        assert want["fc6"] == f, f"H={h}: the two closed forms of fc6 disagree"  # ceil algebra, no code involved
        got = {k: s[k][1:] for k in ("pool1", "pool2", "pool3", "pool4", "pool5", "fc6", "fc7", "score_fr")}
        assert got == {"pool1": (want["pools"][0],) * 2, "pool2": (want["pools"][1],) * 2,
                       "pool3": (want["pools"][2],) * 2, "pool4": (want["pools"][3],) * 2,
                       "pool5": (want["pools"][4],) * 2, "fc6": (f, f), "fc7": (f, f), "score_fr": (f, f)}, f"H={h}"
        if name == "fcn32s":
            assert s["upscore"][1:] == (32 * f + 32,) * 2, f"H={h}"
        else:
            assert s["upscore2"][1:] == (2 * f + 2,) * 2, f"H={h}"
            assert s["score_pool4c"][1:] == (2 * f + 2,) * 2, f"H={h}"
            if name == "fcn16s":
                assert s["upscore16"][1:] == (32 * f + 48,) * 2, f"H={h}"
            else:
                assert s["upscore_pool4"][1:] == (4 * f + 6,) * 2, f"H={h}"
                assert s["score_pool3c"][1:] == (4 * f + 6,) * 2, f"H={h}"
                assert s["upscore8"][1:] == (32 * f + 56,) * 2, f"H={h}"
        assert s["score"] == (21, h, h), f"H={h}: output is {s['score']}"


def test_reference_example_h500(full_width):
    s = shapes_by_name(full_width["fcn8s"], 500)
    assert [s[f"pool{k}"][1] for k in range(1, 6)] == [349, 175, 88, 44, 22]
    assert s["fc6"] == (4096, 16, 16)
    assert s["score_fr"] == (21, 16, 16)
    assert s["upscore8"] == (21, 568, 568)
    assert s["score"] == (21, 500, 500)
    # channels of the paper's network
    assert [s[f"pool{k}"][0] for k in range(1, 6)] == [64, 128, 256, 512, 512]


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("hw", [(1, 1000), (500, 375), (375, 500), (33, 2), (224, 97), (719, 31)])
def test_non_square_inputs_follow_the_closed_form_per_axis(full_width, name, hw):
    h, w = hw
    s = shapes_by_name(full_width[name], h, w)
    fh, fw = closed_forms(h), closed_forms(w)
    assert s["score_fr"][1:] == (fh["F"], fw["F"])
    for k in range(5):
        assert s[f"pool{k + 1}"][1:] == (fh["pools"][k], fw["pools"][k])
    last = {"fcn32s": "upscore", "fcn16s": "upscore16"}.get(name, "upscore8")
    assert s[last][1:] == (fh[last], fw[last])
    assert s["score"] == (21, h, w)


def test_strides_and_receptive_fields_of_the_trace(full_width):
    """Hand-worked geometry: pool k has stride 2^k; conv1_1's 3x3 sees 3 pixels, conv1_2 5, pool1 6;
    fc6 (7x7 at stride 32 after pool5, RF 212) sees 212 + 6 * 32 = 404; each 2x upsampling halves the
    stride (score_fr 32 -> upscore2 16 -> upscore_pool4 8) and upscore8 brings it to 1 input pixel."""
    blobs = {b.name: b for b in fcn_blobs(full_width["fcn8s"], 500)}
    assert [blobs[f"pool{k}"].stride for k in range(1, 6)] == [2, 4, 8, 16, 32]
    assert (blobs["conv1_1"].receptive_field, blobs["conv1_2"].receptive_field, blobs["pool1"].receptive_field) == (3, 5, 6)
    assert blobs["pool5"].receptive_field == 212
    assert blobs["fc6"].receptive_field == 404
    assert [blobs[k].stride for k in ("score_fr", "upscore2", "upscore_pool4", "upscore8")] == [32, 16, 8, 1]
    assert blobs["score"].stride == 1


def test_trace_rejects_other_models():
    from minifcn.models import EncoderDecoder

    with pytest.raises(TypeError, match="EncoderDecoder"):
        fcn_blobs(EncoderDecoder(base_width=2), 32)


# -- the trace against real forward passes ------------------------------------------------

def record_shapes(model, monkeypatch):
    """Wrap every direct child's forward so that it records its output shape (C, H, W)."""
    seen = {}
    for name, layer in model.named_children():
        def recording(*args, _orig=layer.forward, _name=name, **kwargs):
            y = _orig(*args, **kwargs)
            seen[_name] = tuple(y.shape)
            return y
        monkeypatch.setattr(layer, "forward", recording)
    return seen


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("hw", [(1, 1), (7, 33), (64, 31)])
def test_trace_matches_a_real_forward_pass(monkeypatch, name, hw):
    h, w = hw
    model = VARIANTS[name](num_classes=3, width=TINY, seed=1)
    seen = record_shapes(model, monkeypatch)
    x = np.random.default_rng(0).standard_normal((2, 3, h, w)).astype(np.float32)
    y = model(x)
    traced = {b.name: b.shape for b in fcn_blobs(model, h, w) if b.name != "data"}
    assert set(traced) == set(seen), f"traced but not run: {set(traced) - set(seen)}; run but not traced: {set(seen) - set(traced)}"
    for layer, shape in seen.items():
        assert shape == (2,) + traced[layer], f"{layer}: ran {shape}, traced {traced[layer]}"
    assert y.shape == (2, 3, h, w)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_returns_exactly_the_input_size(name):
    model = VARIANTS[name](num_classes=5, width=TINY, seed=2)
    model.eval()
    rng = np.random.default_rng(3)
    for h, w in [(1, 13), (2, 1), (7, 7), (31, 2), (33, 65), (65, 33)]:
        x = rng.standard_normal((3, 3, h, w)).astype(np.float32)
        y = model(x)
        assert y.shape == (3, 5, h, w), f"input {x.shape} -> {y.shape}"
        assert y.dtype == np.float32
        assert np.isfinite(y).all()
