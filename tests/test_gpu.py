"""The CuPy path against the NumPy path on a real GPU: a whole FCN-8s forward and backward, SGD,
the confusion matrix, checkpoints across devices, a training epoch, and the CuPy kernels minifcn
writes (SGD's update, dropout's masks, the confusion matrix's counting) against their NumPy twins.

Every test here needs CuPy and a CUDA device, and is skipped cleanly without them. The layer
tests run on CuPy too, through the ``xp`` fixture (``pytest -m gpu`` runs all of them):
``benchmarks/gpu_check.sh`` is the one command for a machine with a GPU.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minifcn.backend import device_of, gpu_available, to_device, to_numpy
from minifcn.checkpoint import load_checkpoint, save_checkpoint, split_prefix
from minifcn.layers import Dropout
from minifcn.layers.activation import hashed_keep_mask
from minifcn.metrics import ConfusionMatrix, count_bins
from minifcn.models import FCN8s
from minifcn.module import Parameter
from minifcn.optim import SGD
from minifcn.train import TrainConfig, load_model, train

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="CuPy with a visible CUDA device is not available")]

TOL = {np.float64: 1e-10, np.float32: 1e-4}


def small_fcn8s(dtype, seed=0):
    """FCN-8s at width 0.125, 3 classes, learned 2x upsampling; dropout's masks drawn on the host
    (the same on both devices); score layers and biases random so every branch carries gradient."""
    model = FCN8s(num_classes=3, width=0.125, learn_upsampling=True, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, p in model.named_parameters():
        if name.endswith(".bias") or name.startswith("score"):
            p.data[...] = (rng.uniform(0.05, 0.5, p.shape) * rng.choice([-1.0, 1.0], p.shape)).astype(dtype)
    for m in model.modules():
        if isinstance(m, Dropout):
            m.host_masks = True
    return model


def forward_backward(model, x, dy):
    model.zero_grad()
    y = model(x)
    dx = model.backward(dy)
    return y, dx, {n: p.grad.copy() for n, p in model.named_parameters() if p.trainable}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_fcn8s_logits_and_every_gradient_match_the_cpu(dtype, rel_err):
    """FCN-8s (width 0.125) on 2x3x40x40 in training mode (dropout on, host masks): logits, the
    input gradient and every parameter gradient, GPU against CPU."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 40, 40)).astype(dtype)
    dy = rng.standard_normal((2, 3, 40, 40)).astype(dtype)  # the logits' shape: 3 classes at the input's size
    y_c, dx_c, grads_c = forward_backward(small_fcn8s(dtype), x, dy)
    y_g, dx_g, grads_g = forward_backward(small_fcn8s(dtype).to("gpu"), to_device(x, "gpu"), to_device(dy, "gpu"))
    assert device_of(y_g) == "gpu" and y_g.dtype == dtype
    tol = TOL[dtype]
    assert rel_err(y_g, y_c) < tol
    assert rel_err(dx_g, dx_c) < tol
    assert set(grads_g) == set(grads_c) and "conv1_1.weight" in grads_g and "upscore2.weight" in grads_g
    errors = {n: rel_err(grads_g[n], grads_c[n]) for n in grads_c}
    assert max(errors.values()) < tol, {n: e for n, e in errors.items() if e >= tol}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_one_sgd_step_gives_the_same_bits_on_both_devices(dtype, nesterov):
    """The fused kernel (GPU) and the chunked loop (CPU) run the same operations in the same
    order without fused multiply-adds: one step with momentum, decay and multipliers, twice."""
    rng = np.random.default_rng(2)
    shapes, mults = [(3000, 700), (5,), (64, 3, 3, 3)], [(1.0, 1.0), (2.0, 0.0), (1.0, 1.0)]
    cpu = [Parameter(rng.standard_normal(s).astype(dtype), lr_mult=m, decay_mult=d) for s, (m, d) in zip(shapes, mults)]
    gpu = [Parameter(to_device(p.data, "gpu"), lr_mult=p.lr_mult, decay_mult=p.decay_mult) for p in cpu]
    opts = [SGD(ps, lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=nesterov) for ps in (cpu, gpu)]
    assert [SGD.route(p) for p in gpu] == ["fused"] * 3 and [SGD.route(p) for p in cpu] == ["chunked"] * 3
    for _ in range(2):
        for pc, pg in zip(cpu, gpu):
            g = rng.standard_normal(pc.shape).astype(dtype)
            pc.grad[...], pg.grad[...] = g, to_device(g, "gpu")
        for opt in opts:
            opt.step()
    for i, (pc, pg) in enumerate(zip(cpu, gpu)):
        np.testing.assert_array_equal(to_numpy(pg.data), pc.data, err_msg=f"parameter {i}")
        np.testing.assert_array_equal(to_numpy(opts[1].velocity[str(i)]), opts[0].velocity[str(i)])


def test_confusion_matrix_of_an_all_ignored_batch_on_the_gpu():
    cm = ConfusionMatrix(21)
    pred = to_device(np.random.default_rng(3).integers(0, 21, (2, 50, 50)), "gpu")
    cm.update(pred, to_device(np.full((2, 50, 50), 255, np.uint8), "gpu"))
    assert cm.matrix.sum() == 0
    label = to_device(np.random.default_rng(4).integers(0, 21, (2, 50, 50)), "gpu")
    cm.update(pred, label)
    want = ConfusionMatrix(21)
    want.update(to_numpy(pred), to_numpy(label))
    np.testing.assert_array_equal(cm.matrix, want.matrix)
    assert cm.matrix.sum() == 2 * 50 * 50


def test_count_bins_kernel_matches_bincount():
    index = np.random.default_rng(5).integers(0, 444, 100_000)
    np.testing.assert_array_equal(to_numpy(count_bins(to_device(index, "gpu"), 445)), np.bincount(index, minlength=445))


def test_dropout_kernel_matches_its_numpy_twin():
    for dtype in (np.float32, np.float64):
        threshold = int(np.ceil(0.3 * 2**24))
        import cupy  # noqa: PLC0415

        mask = hashed_keep_mask(99, 123_457, threshold, 1 / 0.7, cupy, dtype)
        np.testing.assert_array_equal(to_numpy(mask), hashed_keep_mask(99, 123_457, threshold, 1 / 0.7, np, dtype))


def test_dropout_draws_on_the_device_by_default_and_host_masks_match_the_cpu(rng):
    x = rng.standard_normal((2, 8, 6, 6))
    cpu_y = Dropout(0.5, seed=3)(x)
    host_y = Dropout(0.5, seed=3, host_masks=True)(to_device(x, "gpu"))
    np.testing.assert_array_equal(to_numpy(host_y), cpu_y)           # host masks: the same on both devices
    dev_y = to_numpy(Dropout(0.5, seed=3)(to_device(x, "gpu")))
    assert not np.array_equal(dev_y, cpu_y)                            # device masks differ from the CPU's
    assert abs((dev_y != 0).mean() - 0.5) < 0.1


def test_checkpoint_of_a_gpu_model_loads_on_the_cpu_and_back(tmp_path, rel_err):
    x = np.random.default_rng(6).standard_normal((1, 3, 24, 24))
    gpu = small_fcn8s(np.float64, seed=1).to("gpu").eval()
    save_checkpoint(tmp_path / "gpu.npz", {f"model.{k}": v for k, v in gpu.state_dict().items()}, {"epoch": 0})
    arrays, _ = load_checkpoint(tmp_path / "gpu.npz")
    cpu = small_fcn8s(np.float64, seed=2).eval()
    cpu.load_state_dict(split_prefix(arrays, "model"))
    assert rel_err(cpu(x), gpu(to_device(x, "gpu"))) < 1e-10
    save_checkpoint(tmp_path / "cpu.npz", {f"model.{k}": v for k, v in cpu.state_dict().items()}, {"epoch": 0})
    back = small_fcn8s(np.float64, seed=3).to("gpu").eval()
    back.load_state_dict(split_prefix(load_checkpoint(tmp_path / "cpu.npz")[0], "model"))
    for (n, p), (_, q) in zip(back.named_parameters(), gpu.named_parameters()):
        assert device_of(p.data) == "gpu"
        np.testing.assert_array_equal(to_numpy(p.data), to_numpy(q.data), err_msg=n)


def test_one_training_epoch_on_the_gpu_matches_the_cpu(tmp_path):
    """train(..., device='gpu') on 4 tiny shapes images (dropout off, so both devices see the same
    network): the same losses and scores as on the CPU within float32 rounding."""
    def cfg(device):
        return TrainConfig(model="fcn8s", width=1 / 32, image_size=16, train_images=4, val_images=2, batch_size=2,
                           ranks=1, epochs=1, lr=0.02, dropout=0.0, seed=3, out=str(tmp_path / device), device=device,
                           progress=False, num_preview=1)

    on_gpu, on_cpu = train(cfg("gpu"), log=lambda *a: None), train(cfg("cpu"), log=lambda *a: None)
    assert math.isfinite(on_gpu[0]["train_loss"])
    assert on_gpu[0]["train_loss"] == pytest.approx(on_cpu[0]["train_loss"], rel=1e-4)
    assert on_gpu[0]["pixel_acc"] == pytest.approx(on_cpu[0]["pixel_acc"], abs=1e-3)
    model, _ = load_model(tmp_path / "gpu" / "checkpoint.npz", device="gpu")
    assert {device_of(p.data) for p in model.parameters()} == {"gpu"}


def test_a_numpy_batch_into_a_gpu_model_names_both_devices():
    model = small_fcn8s(np.float32).to("gpu")
    with pytest.raises(ValueError, match=r"Conv2d: input on the CPU \(a NumPy array\), weights on the GPU"):
        model(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"Conv2d: input on the GPU \(a CuPy array\), weights on the CPU"):
        small_fcn8s(np.float32)(to_device(np.zeros((1, 3, 16, 16), np.float32), "gpu"))
