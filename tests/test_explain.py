"""minifcn.explain: the convolution matrix, FCN geometry and size formulas, and the `minifcn explain` CLI."""
from __future__ import annotations

import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from minifcn.cli import main
from minifcn.explain import (
    conv_matrix, coordinate_maps, derived_crop_offsets, fcn8s_stage_scores, fcn8s_streams, fcn_table, format_fcn_table,
    size_report, transposed_conv_demo, transposed_output_sizes,
)
from minifcn.layers import Conv2d, ConvTranspose2d, conv_output_size, conv_transpose_output_size
from minifcn.models import build_model

ROOT = Path(__file__).resolve().parent.parent

# (in_shape (C, H, W), out channels, kernel, stride, padding, dilation)
GEOMETRIES = [
    ((1, 4, 4), 1, 3, 2, 1, 1),
    ((1, 5, 5), 1, 3, 1, 0, 1),
    ((2, 5, 6), 3, 3, 1, 1, 1),
    ((3, 7, 7), 2, 4, 2, 1, 1),
    ((2, 9, 8), 2, 3, 2, 2, 2),
    ((1, 8, 8), 2, 2, 2, 0, 1),
    ((2, 6, 7), 2, (2, 3), (1, 2), (0, 1), 1),
    ((1, 11, 9), 2, 5, 3, 2, 1),
    ((4, 3, 3), 3, 1, 1, 0, 1),
]


def geometry_id(g):
    in_shape, cout, k, s, p, d = g
    return f"in{'x'.join(map(str, in_shape))}-out{cout}-k{k}-s{s}-p{p}-d{d}".replace(" ", "")


def weight_for(g, seed=0):
    in_shape, cout, k, *_ = g
    kh, kw = (k, k) if np.isscalar(k) else k
    return np.random.default_rng(seed).standard_normal((cout, in_shape[0], kh, kw))


@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
def test_conv_matrix_is_the_convolution(g):
    in_shape, cout, k, s, p, d = g
    w = weight_for(g)
    C = conv_matrix(in_shape, w, s, p, d)
    conv = Conv2d(in_shape[0], cout, k, s, p, d, bias=False, dtype=np.float64)
    conv.weight.data[...] = w
    x = np.random.default_rng(1).standard_normal((1, *in_shape))
    y = conv(x)
    assert C.shape == (y.size, x.size)
    np.testing.assert_allclose(C @ x.ravel(), y.ravel(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("g", GEOMETRIES, ids=geometry_id)
def test_transposed_conv_and_conv_backward_are_c_transpose(g):
    in_shape, _, _, s, p, d = g
    demo = transposed_conv_demo(in_shape, weight_for(g), stride=s, padding=p, dilation=d, seed=3)
    assert demo.transpose_err < 1e-10
    assert demo.backward_err < 1e-10
    assert demo.transpose_backward_err < 1e-10
    assert demo.adjoint_err < 1e-10
    assert demo.in_shape == tuple(in_shape)


def test_conv_matrix_small_example_by_hand():
    """4x4 input, weights 1..9, stride 2, padding 1: output (0, 0) reads the kernel's lower-right 2x2 block."""
    C = conv_matrix((1, 4, 4), np.arange(1.0, 10.0).reshape(1, 1, 3, 3), stride=2, padding=1)
    assert C.shape == (4, 16)
    np.testing.assert_array_equal(C[0], [5, 6, 0, 0, 8, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(C[3], [0, 0, 0, 0, 0, 1, 2, 3, 0, 4, 5, 6, 0, 7, 8, 9])


def test_demo_reports_output_padding():
    demo = transposed_conv_demo((1, 4, 4), np.ones((1, 1, 3, 3)), stride=2, padding=1)
    assert demo.output_padding == (1, 1)   # 4 -> 2 -> 3 without it
    assert "output_padding=(1, 1)" in str(demo)


def test_conv_matrix_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight"):
        conv_matrix((2, 4, 4), np.ones((1, 3, 3, 3)))


# --------------------------------------------------------------------------- FCN geometry

REFERENCE_OFFSETS = {
    "fcn32s": {"score": 19},
    "fcn16s": {"score_pool4c": 5, "score": 27},
    "fcn8s": {"score_pool4c": 5, "score_pool3c": 9, "score": 31},
    "fcn8s-atonce": {"score_pool4c": 5, "score_pool3c": 9, "score": 31},
}


@pytest.fixture(scope="module")
def models():
    return {name: build_model(name, num_classes=21, width=1 / 64) for name in REFERENCE_OFFSETS}


@pytest.mark.parametrize("name", list(REFERENCE_OFFSETS))
def test_fcn_table_offsets_match_reference(models, name):
    rows = fcn_table(model=models[name], height=500)
    crops = {r.blob: (r.crop_offset, r.derived_offset) for r in rows if r.layer == "Crop"}
    assert crops == {blob: (o, o) for blob, o in REFERENCE_OFFSETS[name].items()}
    assert derived_crop_offsets(models[name]) == REFERENCE_OFFSETS[name]


@pytest.mark.parametrize("name", list(REFERENCE_OFFSETS))
@pytest.mark.parametrize("size", [(1, 1), (31, 47), (64, 64), (227, 100), (500, 375)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fcn_table_output_equals_input_size(models, name, size):
    rows = fcn_table(model=models[name], height=size[0], width=size[1])
    assert rows[0].blob == "data" and rows[-1].blob == "score"
    assert rows[-1].shape[1:] == size
    assert rows[-1].coord == (1, 0) and rows[-1].stride == 1


def test_fcn_table_500_matches_reference_sizes():
    rows = {r.blob: r for r in fcn_table("fcn8s", 500)}
    assert [rows[f"pool{i}"].shape[1] for i in range(1, 6)] == [349, 175, 88, 44, 22]
    assert rows["fc6"].shape[1] == 16 and rows["upscore8"].shape[1] == 568
    assert rows["upscore2"].shape[1] == 34 and rows["upscore_pool4"].shape[1] == 70
    assert rows["conv1_1"].coord == (1, -99) and rows["fc6"].coord == (32, Fraction(25, 2))
    assert [rows[b].stride for b in ("pool3", "pool4", "score_fr")] == [8, 16, 32]
    assert rows["conv1_1"].receptive_field == 3 and rows["pool1"].receptive_field == 6
    text = format_fcn_table(list(rows.values()))
    assert "31 (31)" in text and "relu" not in text


def test_fcn_table_channels_follow_model_width():
    rows = {r.blob: r for r in fcn_table("fcn32s", 64, model_width=0.125, num_classes=6)}
    assert rows["conv1_1"].shape[0] == 8 and rows["fc6"].shape[0] == 512 and rows["score"].shape[0] == 6


def test_coordinate_maps_catch_a_wrong_offset():
    model = build_model("fcn8s", width=1 / 64)
    model.score_pool4c.offset = (6, 6)
    assert derived_crop_offsets(model)["score_pool4c"] == 5   # derived from the maps, not the model
    with pytest.raises(ValueError, match="fuse_pool4"):
        coordinate_maps(model)                                  # the Add would mix misaligned blobs


def test_padding_shifts_the_output_grid():
    model = build_model("fcn8s", width=1 / 64)
    assert coordinate_maps(model)["upscore8"] == (1, -31)
    model.conv1_1.padding = (1, 1)
    assert coordinate_maps(model)["upscore8"] == (1, 68)     # padding 1: the output starts 68 rows inside


def test_fcn8s_stage_scores_last_stage_is_model_output():
    model = build_model("fcn8s", num_classes=4, width=1 / 32, dropout=0.0).eval()
    rng = np.random.default_rng(0)
    for name in ("score_fr", "score_pool4", "score_pool3"):
        layer = getattr(model, name)
        layer.weight.data[...] = rng.standard_normal(layer.weight.shape) * 0.1
    x = rng.standard_normal((2, 3, 37, 45)).astype(np.float32)
    stages = fcn8s_stage_scores(model, x)
    assert set(stages) == {"32s", "16s", "8s"}
    assert all(s.shape == (2, 4, 37, 45) for s in stages.values())
    np.testing.assert_array_equal(stages["8s"], model(x))
    assert not np.allclose(stages["32s"], stages["8s"])
    a, b, c, output = fcn8s_streams(model, x)
    np.testing.assert_allclose(a + b + c, output, rtol=0, atol=1e-5 * np.abs(output).max())
    np.testing.assert_allclose(stages["16s"], a + b + c.mean(axis=(2, 3), keepdims=True), rtol=1e-6, atol=1e-6)


def test_fcn8s_stages_coincide_while_skips_are_zero():
    """Staged training starts the skip classifiers at zero: all three stages then say the same."""
    model = build_model("fcn8s", num_classes=3, width=1 / 32, dropout=0.0).eval()
    model.score_fr.weight.data[...] = np.random.default_rng(1).standard_normal(model.score_fr.weight.shape)
    x = np.random.default_rng(2).standard_normal((1, 3, 33, 40)).astype(np.float32)
    stages = fcn8s_stage_scores(model, x)
    np.testing.assert_allclose(stages["32s"], stages["8s"], rtol=0, atol=1e-5 * np.abs(stages["8s"]).max())
    np.testing.assert_allclose(stages["16s"], stages["8s"], rtol=0, atol=1e-5 * np.abs(stages["8s"]).max())
    with pytest.raises(TypeError):
        fcn8s_stage_scores(build_model("fcn32s", width=1 / 64), x)


# --------------------------------------------------------------------------- sizes

def brute_force_outputs(in_size, k, s, p, d, limit=120):
    span = d * (k - 1) + 1
    return [n for n in range(1, limit) if n + 2 * p >= span and conv_output_size(n, k, s, p, d) == in_size]


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [1, 2])
def test_transposed_output_sizes_brute_force(s, d):
    checked = 0
    for in_size in range(1, 10):
        for k in range(1, 6):
            for p in range(0, 3):
                got = transposed_output_sizes(in_size, k, s, p, d)
                assert [n for n, _ in got] == brute_force_outputs(in_size, k, s, p, d), (in_size, k, s, p, d)
                natural = conv_transpose_output_size(in_size, k, s, p, 0, d)
                assert all(n == natural + op and 0 <= op < s for n, op in got)
                checked += len(got)
    assert checked > 0


@pytest.mark.parametrize("in_size,k,s,p", [(4, 3, 2, 1), (5, 4, 2, 1), (3, 5, 3, 2), (7, 3, 3, 0)],
                         ids=lambda v: str(v))
def test_transposed_output_sizes_are_what_the_layer_produces(in_size, k, s, p):
    """Each (size, output_padding) pair is the layer's output size, and a convolution maps it back."""
    x = np.zeros((1, 1, in_size, in_size))
    for size, op in transposed_output_sizes(in_size, k, s, p):
        t = ConvTranspose2d(1, 1, k, stride=s, padding=p, output_padding=op, bias=False, dtype=np.float64)
        y = t(x)
        assert y.shape[2:] == (size, size)
        assert Conv2d(1, 1, k, stride=s, padding=p, bias=False, dtype=np.float64)(y).shape[2:] == (in_size, in_size)


def test_size_report_substitutes_numbers():
    text = size_report(7, 3, 2, 1)
    assert "floor((7 + 2*1 - 1*(3-1) - 1) / 2) + 1 = floor(6 / 2) + 1 = 4" in text
    assert "13 (output_padding=0), 14 (output_padding=1)" in text
    assert "7 (output_padding=0), 8 (output_padding=1)" in text


# --------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("argv,expected", [
    (["explain", "conv-matrix", "--size", "4", "--kernel", "3", "--stride", "2", "--padding", "1"],
     ["5 6 . . 8 9", "output_padding=(1, 1)", "max |Conv2d.backward(dy)    - C^T dy|"]),
    (["explain", "fcn", "--model", "fcn8s", "--size", "500"],
     ["upscore8", "568", "5 (5)", "9 (9)", "31 (31)"]),
    (["explain", "fcn", "--model", "fcn32s", "--size", "64x80", "--all"],
     ["relu1_1", "19 (19)", "3 x 64 x 80"]),
    (["explain", "sizes", "--size", "7", "--kernel", "3", "--stride", "2", "--padding", "1"],
     ["= 4", "13 (output_padding=0), 14 (output_padding=1)"]),
], ids=["conv-matrix", "fcn8s-500", "fcn32s-all", "sizes"])
def test_cli_explain(argv, expected, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, f"{text!r} missing from:\n{out}"


def test_cli_explain_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "minifcn", "explain", "sizes", "--size", "4", "--kernel", "4",
                             "--stride", "2", "--padding", "1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "8 (output_padding=0), 9 (output_padding=1)" in result.stdout


def test_cli_explain_bad_model_is_one_line_error(capsys):
    assert main(["explain", "fcn", "--model", "fcn7s"]) == 2
    assert "unknown model" in capsys.readouterr().err
