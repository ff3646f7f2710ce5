"""VGG16 weight import and staged initialisation (minifcn/models/weights.py)."""
from __future__ import annotations

import numpy as np
import pytest

import minifcn.layers.conv as conv_module
import minifcn.models.vgg as vgg_module
import minifcn.module as module_module
from minifcn.layers import Conv2d
from minifcn.models import FCN8s, FCN16s, FCN32s, load_vgg16_npz, transfer_by_name, vgg16_to_fcn_state
from minifcn.models.weights import vgg16_name_map

TV_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
FCN_CONVS = ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
             "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3"]
VGG_CHANNELS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)


def torchvision_shapes(scale=1):
    """Shapes of torchvision's vgg16().state_dict() (channels divided by ``scale``), fc8 included."""
    shapes, cin = {}, 3
    for k, c in zip(TV_CONV_INDICES, VGG_CHANNELS):
        c //= scale
        shapes[f"features.{k}.weight"], shapes[f"features.{k}.bias"] = (c, cin, 3, 3), (c,)
        cin = c
    fc = 4096 // scale
    shapes.update({"classifier.0.weight": (fc, cin * 7 * 7), "classifier.0.bias": (fc,),
                   "classifier.3.weight": (fc, fc), "classifier.3.bias": (fc,),
                   "classifier.6.weight": (1000, fc), "classifier.6.bias": (1000,)})
    return shapes


def fake_vgg16(scale, rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in torchvision_shapes(scale).items()}


def test_name_map_follows_torchvision_indices():
    m = vgg16_name_map()
    assert m == {**{f"features.{k}": n for k, n in zip(TV_CONV_INDICES, FCN_CONVS)},
                 "classifier.0": "fc6", "classifier.3": "fc7"}


def test_width_1_state_has_every_name_and_shape():
    """The paper's network: conv1_1 ... conv5_3, fc6 (4096, 25088) -> (4096, 512, 7, 7), fc7 -> (4096, 4096, 1, 1);
    fc8 (classifier.6) dropped. The fake state is lazily-zero arrays with a few marked entries."""
    with pytest.MonkeyPatch.context() as mp:  # zero initial weights: building is then cheap (see test_fcn.py)
        lazy = type("LazyZeros", (), {"zeros_like": staticmethod(lambda a: np.zeros(a.shape, a.dtype))})
        mp.setattr(conv_module, "_uniform_init", lambda shape, fan_in, dtype, rng: np.zeros(shape, dtype))
        mp.setattr(vgg_module, "he_init", lambda conv, rng: conv)
        mp.setattr(module_module, "get_array_module", lambda *arrays: lazy)
        model = FCN32s(num_classes=21, width=1.0)
    state = {k: np.zeros(s, np.float32) for k, s in torchvision_shapes().items()}
    fc6 = state["classifier.0.weight"]
    fc6[17, 3 * 49 + 2 * 7 + 5] = 1.5       # output 17, channel 3, row 2, column 5 in (C, 7, 7) order
    fc6[4095, 25087] = -2.0                   # the last entry: channel 511, row 6, column 6
    state["classifier.3.weight"][9, 4000] = 3.0
    state["features.28.bias"][511] = 4.0
    out = vgg16_to_fcn_state(state, model)
    params = dict(model.named_parameters())
    assert sorted(out) == sorted(f"{n}.{k}" for n in FCN_CONVS + ["fc6", "fc7"] for k in ("weight", "bias"))
    for name, value in out.items():
        assert value.shape == params[name].shape, name
    assert out["fc6.weight"].shape == (4096, 512, 7, 7) and out["fc7.weight"].shape == (4096, 4096, 1, 1)
    assert out["fc6.weight"][17, 3, 2, 5] == 1.5 and out["fc6.weight"][4095, 511, 6, 6] == -2.0
    assert np.count_nonzero(out["fc6.weight"]) == 2
    assert out["fc7.weight"][9, 4000, 0, 0] == 3.0
    assert out["conv5_3.bias"][511] == 4.0
    assert sum(out[f"{n}.{k}"].size for n in FCN_CONVS for k in ("weight", "bias")) == 14_714_688


def test_fully_connected_layer_equals_7x7_convolution():
    """fc6 applied to a flattened (512, 7, 7) pool5 blob equals a 7x7 convolution with the
    same numbers reshaped to (out, 512, 7, 7); on a larger blob the convolution slides
    that fully connected layer over every 7x7 window."""
    rng = np.random.default_rng(0)
    out = 64
    w_fc = rng.standard_normal((out, 512 * 7 * 7))
    b_fc = rng.standard_normal(out)
    conv = Conv2d(512, out, 7, dtype=np.float64)
    conv.weight.data[...] = w_fc.reshape(out, 512, 7, 7)
    conv.bias.data[...] = b_fc
    blob = rng.standard_normal((1, 512, 7, 7))
    y = conv(blob)
    assert y.shape == (1, out, 1, 1)
    np.testing.assert_allclose(y[0, :, 0, 0], w_fc @ blob.reshape(-1) + b_fc, rtol=1e-10, atol=1e-10)
    big = rng.standard_normal((1, 512, 9, 8))
    y = conv(big)
    assert y.shape == (1, out, 3, 2)
    for p in range(3):
        for q in range(2):
            fc = w_fc @ big[0, :, p:p + 7, q:q + 7].reshape(-1) + b_fc
            np.testing.assert_allclose(y[0, :, p, q], fc, rtol=1e-10, atol=1e-10)


def test_load_vgg16_npz_copies_and_reshapes(tmp_path):
    """A width-1/8 model takes a VGG16 whose channels are all divided by 8: the same code path,
    fast. After loading, fc6 computes the fully connected layer on a 7x7 pool5 window."""
    rng = np.random.default_rng(1)
    state = fake_vgg16(8, rng)
    path = tmp_path / "vgg16.npz"
    np.savez(path, **state)
    model = FCN8s(num_classes=5, width=0.125, dtype=np.float64)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    names = load_vgg16_npz(model, path)
    assert names == sorted(f"{n}.{k}" for n in FCN_CONVS + ["fc6", "fc7"] for k in ("weight", "bias"))
    for tv, fcn in vgg16_name_map().items():
        for k in ("weight", "bias"):
            p = getattr(model, fcn).weight if k == "weight" else getattr(model, fcn).bias
            assert p.data.dtype == np.float64  # cast to the model's dtype
            np.testing.assert_array_equal(p.data.reshape(-1), state[f"{tv}.{k}"].reshape(-1), err_msg=f"{tv}.{k}")
    assert model.fc6.weight.shape == (512, 64, 7, 7) and model.fc7.weight.shape == (512, 512, 1, 1)
    # score layers and upsampling keep their FCN initialisation
    for n, p in model.named_parameters():
        if n.split(".")[0] not in FCN_CONVS + ["fc6", "fc7"]:
            np.testing.assert_array_equal(p.data, before[n], err_msg=n)
    pool5 = rng.standard_normal((1, 64, 7, 7))
    fc6 = state["classifier.0.weight"].astype(np.float64) @ pool5.reshape(-1) + state["classifier.0.bias"]
    np.testing.assert_allclose(model.fc6(pool5)[0, :, 0, 0], fc6, rtol=1e-6)


def test_missing_key_names_the_key(tmp_path):
    state = fake_vgg16(8, np.random.default_rng(2))
    del state["features.14.bias"]
    path = tmp_path / "vgg16.npz"
    np.savez(path, **state)
    with pytest.raises(KeyError, match=r"features\.14\.bias"):
        load_vgg16_npz(FCN32s(num_classes=2, width=0.125), path)


def test_wrong_size_names_the_key_and_shapes(tmp_path):
    state = fake_vgg16(8, np.random.default_rng(3))
    model = FCN32s(num_classes=2, width=0.125)
    state["classifier.0.weight"] = state["classifier.0.weight"][:, :-1]
    with pytest.raises(ValueError, match=r"classifier\.0\.weight.*\(512, 3135\).*fc6\.weight.*\(512, 64, 7, 7\)"):
        vgg16_to_fcn_state(state, model)
    # a full-size VGG16 into a narrow model: the message suggests the width
    big = {k: np.zeros(s, np.float32) for k, s in torchvision_shapes(1).items()}
    with pytest.raises(ValueError, match="width"):
        vgg16_to_fcn_state(big, model)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    state = fake_vgg16(8, np.random.default_rng(4))
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    state["features.0.weight"] = np.array([Payload()], dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **state)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_vgg16_npz(FCN32s(num_classes=2, width=0.125), path)
    assert not marker.exists()


# -- staged training: 32s -> 16s -> 8s by name -------------------------------------------------

def trained_ish(model, seed):
    """Random values everywhere (a stand-in for a trained model)."""
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        p.data[...] = rng.standard_normal(p.shape).astype(p.data.dtype) * 0.3
    return model


def test_transfer_32s_to_16s_to_8s():
    w = 1 / 32
    fcn32 = trained_ish(FCN32s(num_classes=4, width=w, seed=1), 10)
    fcn16 = FCN16s(num_classes=4, width=w, seed=2)
    fresh16 = {n: p.data.copy() for n, p in fcn16.named_parameters()}
    copied = transfer_by_name(fcn32, fcn16)
    backbone = [f"{n}.{k}" for n in FCN_CONVS + ["fc6", "fc7"] for k in ("weight", "bias")]
    assert sorted(copied) == sorted(backbone + ["score_fr.weight", "score_fr.bias"])
    src = dict(fcn32.named_parameters())
    for n, p in fcn16.named_parameters():
        if n in copied:
            np.testing.assert_array_equal(p.data, src[n].data, err_msg=n)
            assert p.data is not src[n].data  # copied, not shared
        else:  # upscore2, score_pool4, upscore16: the 16s's own initialisation
            np.testing.assert_array_equal(p.data, fresh16[n], err_msg=n)
    assert not fcn16.score_pool4.weight.data.any()

    trained_ish(fcn16, 11)
    fcn8 = FCN8s(num_classes=4, width=w, seed=3)
    copied = transfer_by_name(fcn16, fcn8)
    assert sorted(copied) == sorted(backbone + ["score_fr.weight", "score_fr.bias", "upscore2.weight",
                                                "score_pool4.weight", "score_pool4.bias"])
    np.testing.assert_array_equal(fcn8.score_pool4.weight.data, fcn16.score_pool4.weight.data)
    # skip= leaves named parameters alone; a shape mismatch (another class count) is not copied
    fcn8b = FCN8s(num_classes=4, width=w, seed=3)
    assert "score_fr.weight" not in transfer_by_name(fcn16, fcn8b, skip=("score_fr.weight",))
    other = FCN8s(num_classes=6, width=w)
    assert sorted(transfer_by_name(fcn16, other)) == sorted(backbone)


def test_transferred_trunk_computes_the_same_scores():
    """After transfer the 16s computes exactly the 32s's score_fr on any input
    (the trunk is the same function); only the head differs."""
    w = 1 / 32
    fcn32 = trained_ish(FCN32s(num_classes=3, width=w, dtype=np.float64), 12)
    fcn16 = FCN16s(num_classes=3, width=w, dtype=np.float64)
    transfer_by_name(fcn32, fcn16)
    fcn32.eval(), fcn16.eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 40, 37))
    seen = {}
    for model in (fcn32, fcn16):
        real = model.score_fr.forward
        model.score_fr.forward = lambda h, _real=real, _m=model: seen.setdefault(id(_m), _real(h))
        model(x)
    np.testing.assert_array_equal(seen[id(fcn32)], seen[id(fcn16)])
