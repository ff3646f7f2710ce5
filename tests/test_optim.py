"""SGD with momentum, weight decay and per-parameter multipliers; learning-rate
schedules (minifcn/optim.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest

import minifcn.optim as optim_module
from minifcn import routes
from minifcn.backend import to_device, to_numpy
from minifcn.models import FCN8s
from minifcn.module import Parameter
from minifcn.optim import SGD, ConstantLR, PolyLR, StepLR, WarmupLR, make_schedule, suggest_lr

GRADS_A = ([0.5, 0.25], [-1.0, 0.5])  # gradient of parameter a at step 1 and step 2
GRADS_B = ([1.0], [2.0])


def two_steps(nesterov, device="cpu"):
    """lr 0.1, momentum 0.9, weight decay 0.1; a with multipliers (1, 1), b with (2, 0) (an FCN bias)."""
    a = Parameter(to_device(np.array([1.0, -2.0]), device))
    b = Parameter(to_device(np.array([3.0]), device), lr_mult=2.0, decay_mult=0.0)
    opt = SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.1, nesterov=nesterov)
    after = []
    for ga, gb in zip(GRADS_A, GRADS_B):
        a.grad[...], b.grad[...] = to_device(np.array(ga), device), to_device(np.array(gb), device)
        opt.step()
        after.append((to_numpy(a.data).copy(), to_numpy(b.data).copy()))
    return after


def test_two_steps_by_hand(device):
    (a1, b1), (a2, b2) = two_steps(nesterov=False, device=device)
    # a: lr 0.1, decay 0.1.
    #   step 1: g + wd*w = [0.5 + 0.1*1, 0.25 + 0.1*(-2)] = [0.6, 0.05]; v = [0.6, 0.05]
    #           w = [1 - 0.1*0.6, -2 - 0.1*0.05] = [0.94, -2.005]
    #   step 2: g + wd*w = [-1 + 0.094, 0.5 - 0.2005] = [-0.906, 0.2995]
    #           v = 0.9*[0.6, 0.05] + that = [-0.366, 0.3445]
    #           w = [0.94 + 0.0366, -2.005 - 0.03445] = [0.9766, -2.03945]
    np.testing.assert_allclose(a1, [0.94, -2.005], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a2, [0.9766, -2.03945], rtol=0, atol=1e-12)
    # b: lr 0.1 * lr_mult 2 = 0.2, decay 0.1 * decay_mult 0 = 0.
    #   step 1: v = 1, w = 3 - 0.2*1 = 2.8;  step 2: v = 0.9*1 + 2 = 2.9, w = 2.8 - 0.2*2.9 = 2.22
    np.testing.assert_allclose(b1, [2.8], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b2, [2.22], rtol=0, atol=1e-12)


def test_two_nesterov_steps_by_hand(device):
    (a1, b1), (a2, b2) = two_steps(nesterov=True, device=device)
    # a: step 1: d = [0.6, 0.05], v = d, update = d + 0.9 v = [1.14, 0.095]
    #            w = [1 - 0.114, -2 - 0.0095] = [0.886, -2.0095]
    #    step 2: d = [-1 + 0.0886, 0.5 - 0.20095] = [-0.9114, 0.29905]
    #            v = 0.9*[0.6, 0.05] + d = [-0.3714, 0.34405]
    #            update = d + 0.9 v = [-1.24566, 0.608695]
    #            w = [0.886 + 0.124566, -2.0095 - 0.0608695] = [1.010566, -2.0703695]
    np.testing.assert_allclose(a1, [0.886, -2.0095], rtol=0, atol=1e-12)
    np.testing.assert_allclose(a2, [1.010566, -2.0703695], rtol=0, atol=1e-12)
    # b (lr 0.2, no decay): step 1: v = 1, update 1 + 0.9 = 1.9, w = 3 - 0.38 = 2.62
    #                       step 2: v = 2.9, update 2 + 2.61 = 4.61, w = 2.62 - 0.922 = 1.698
    np.testing.assert_allclose(b1, [2.62], rtol=0, atol=1e-12)
    np.testing.assert_allclose(b2, [1.698], rtol=0, atol=1e-12)


def test_no_momentum_is_plain_gradient_descent(device):
    p = Parameter(to_device(np.array([1.0, 2.0]), device))
    opt = SGD([p], lr=0.5, momentum=0.0, weight_decay=0.2)
    p.grad[...] = to_device(np.array([1.0, -1.0]), device)
    opt.step()  # w - 0.5 * (g + 0.2 w) = [1 - 0.5*1.2, 2 - 0.5*(-0.6)] = [0.4, 2.3]
    np.testing.assert_allclose(to_numpy(p.data), [0.4, 2.3], rtol=0, atol=1e-12)
    assert not to_numpy(opt.velocity["0"]).any()  # no momentum buffer is built up


def test_frozen_parameters_are_left_alone():
    model = FCN8s(num_classes=3, width=1 / 64)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.trainable}
    assert set(frozen) == {"upscore2.weight", "upscore_pool4.weight", "upscore8.weight"}
    opt = SGD(model, lr=0.1, momentum=0.9, weight_decay=0.1)
    assert {n for n, _ in opt.named_params} == {n for n, p in model.named_parameters() if p.trainable}
    for p in model.parameters():
        p.grad[...] = 1.0
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            np.testing.assert_array_equal(p.data, frozen[n])
    assert model.score_fr.weight.data.min() < 0  # while a trainable one moved (from 0, by -lr)
    with pytest.raises(ValueError, match="no trainable"):
        SGD([Parameter(np.zeros(3), trainable=False)], lr=0.1)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_update_equals_the_formula(nesterov, dtype, device):
    """On the CPU a parameter of 3 chunks + 12345 elements is updated chunk by chunk, a small one in
    one; on the GPU each in one fused kernel. All must equal the textbook formula on whole arrays."""
    rng = np.random.default_rng(0)
    sizes = 3 * optim_module._CHUNK + 12345, 1000
    params = [Parameter(to_device(rng.standard_normal(s).astype(dtype), device), lr_mult=m, decay_mult=d)
              for s, m, d in zip(sizes, (1.0, 2.0), (1.0, 0.0))]
    fast = "chunked" if device == "cpu" else "fused"
    assert {SGD.route(p) for p in params} == {fast if routes.mode() == "fast" else "textbook"}
    lr, mu, wd = 0.01, 0.9, 5e-4
    opt = SGD(params, lr=lr, momentum=mu, weight_decay=wd, nesterov=nesterov)
    w = [to_numpy(p.data).astype(np.float64) for p in params]
    v = [np.zeros_like(x) for x in w]
    tail = to_numpy(params[0].data[-100:]).copy()  # past the chunk boundary
    for _ in range(3):
        for i, p in enumerate(params):
            g = rng.standard_normal(p.shape).astype(dtype)
            p.grad[...] = to_device(g, device)
            d = g.astype(np.float64) + wd * p.decay_mult * w[i]
            v[i] = mu * v[i] + d
            w[i] = w[i] - lr * p.lr_mult * (d + mu * v[i] if nesterov else v[i])
        opt.step()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    for i, (p, want) in enumerate(zip(params, w)):
        assert p.data.dtype == dtype and opt.velocity[str(i)].dtype == dtype
        np.testing.assert_allclose(to_numpy(p.data), want, rtol=tol, atol=tol)
    assert (to_numpy(params[0].data[-100:]) != tail).all()  # the second chunk was updated too


def test_the_route_is_chosen_by_the_array_module(monkeypatch):
    """NumPy parameters take the chunked loop; an array module listed in FUSED_UPDATES (CuPy) its
    fused kernel, called once per parameter with the multipliers folded in (a stand-in records it)."""
    monkeypatch.setenv("MINIFCN_ROUTE", "fast")  # (the textbook mode takes neither)
    calls = []
    p = Parameter(np.array([1.0, 2.0]), lr_mult=2.0, decay_mult=0.0)
    q = Parameter(np.array([3.0]))
    opt = SGD([p, q], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    assert SGD.route(p) == "chunked"
    monkeypatch.setitem(optim_module.FUSED_UPDATES, "numpy", lambda *args: calls.append(args))
    assert SGD.route(p) == "fused"
    opt.step()
    assert [(len(c[0]), c[3:]) for c in calls] == [(2, (0.2, 0.0, 0.9, True)), (1, (0.1, 0.01, 0.9, True))]
    assert np.shares_memory(calls[0][0], p.data)  # the parameter itself (its group's buffer), updated in place
    np.testing.assert_array_equal(p.data, [1.0, 2.0])  # the stand-in did the (no) update, not the loop


def test_float32_stays_float32():
    p = Parameter(np.ones((3, 4), np.float32))
    opt = SGD([p], lr=1e-3, momentum=0.99, weight_decay=5e-4, nesterov=True)
    p.grad[...] = 0.5
    data_before = p.data
    opt.step()
    assert p.data.dtype == np.float32 and opt.velocity["0"].dtype == np.float32
    assert p.data is data_before  # updated in place
    assert (p.data < 1).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=0.0), "lr.*0.0"),
    (dict(lr=-0.1), "lr.*-0.1"),
    (dict(lr=float("nan")), "lr.*nan"),
    (dict(lr=float("inf")), "lr.*inf"),
    (dict(lr=0.1, momentum=1.0), "momentum.*1.0"),
    (dict(lr=0.1, momentum=-0.5), "momentum.*-0.5"),
    (dict(lr=0.1, weight_decay=-1e-4), "weight_decay.*-0.0001"),
    (dict(lr=0.1, momentum=0.0, nesterov=True), "nesterov"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGD([Parameter(np.zeros(2))], **kwargs)


def test_non_parameters_are_refused():
    with pytest.raises(TypeError, match="ndarray"):
        SGD([np.zeros(2)], lr=0.1)


def test_state_dict_round_trip():
    """An optimiser restored from another's state continues exactly like it."""
    rng = np.random.default_rng(1)

    def make():
        return [Parameter(np.arange(6.0).reshape(2, 3)), Parameter(np.ones(4), lr_mult=2, decay_mult=0)]

    pa, pb = make(), make()
    a = SGD([("w", pa[0]), ("b", pa[1])], lr=0.1, momentum=0.9, weight_decay=0.01)
    b = SGD([("w", pb[0]), ("b", pb[1])], lr=0.1, momentum=0.9, weight_decay=0.01)
    grads = [[rng.standard_normal(p.shape) for p in pa] for _ in range(4)]
    for g in grads[:2]:
        for p, gi in zip(pa, g):
            p.grad[...] = gi
        a.step()
    state = {k: v.copy() for k, v in a.state_dict().items()}
    assert sorted(state) == ["momentum.b", "momentum.w"] and state["momentum.w"].any()
    for p, q in zip(pa, pb):
        q.data[...] = p.data
    b.load_state_dict(state)
    for g in grads[2:]:
        for ps in (pa, pb):
            for p, gi in zip(ps, g):
                p.grad[...] = gi
        a.step(), b.step()
    for p, q in zip(pa, pb):
        np.testing.assert_array_equal(p.data, q.data)
    # without the momentum the trajectories differ: the state matters
    c_params = make()
    c = SGD([("w", c_params[0]), ("b", c_params[1])], lr=0.1, momentum=0.9, weight_decay=0.01)
    for p, q in zip(c_params, pa):
        p.data[...] = q.data
    with pytest.raises(KeyError, match="momentum.b"):
        c.load_state_dict({"momentum.w": state["momentum.w"]})
    with pytest.raises(ValueError, match=r"momentum.w.*\(3, 2\).*\(2, 3\)"):
        c.load_state_dict({"momentum.w": np.zeros((3, 2)), "momentum.b": np.zeros(4)})


def test_schedules():
    assert [ConstantLR(0.1)(t) for t in (0, 10, 10 ** 6)] == [0.1] * 3
    step = StepLR(0.1, step_size=10, gamma=0.5)
    assert [step(t) for t in (0, 9, 10, 19, 20, 25)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    poly = PolyLR(0.1, max_iter=100, power=0.9)
    assert poly(0) == pytest.approx(0.1)
    assert poly(50) == pytest.approx(0.1 * 0.5 ** 0.9)
    assert poly(75) == pytest.approx(0.1 * 0.25 ** 0.9)
    assert poly(100) == 0.0 and poly(150) == 0.0
    assert all(poly(t) >= poly(t + 1) for t in range(120))
    assert isinstance(make_schedule("constant", 0.1, 100), ConstantLR)
    s = make_schedule("step", 0.1, 30)  # step_size defaults to a third of max_iter
    assert (s(9), s(10)) == pytest.approx((0.1, 0.01))
    p = make_schedule("poly", 0.2, 40)
    assert p(20) == pytest.approx(0.2 * 0.5 ** 0.9)
    with pytest.raises(ValueError, match="'cosine'"):
        make_schedule("cosine", 0.1, 100)
    with pytest.raises(ValueError, match="step_size.*0"):
        StepLR(0.1, 0)
    with pytest.raises(ValueError, match="max_iter.*0"):
        PolyLR(0.1, 0)


def test_poly_power_and_warmup():
    p = make_schedule("poly", 0.2, 40, power=2.0)
    assert p(20) == pytest.approx(0.2 * 0.25) and p(0) == pytest.approx(0.2)
    w = make_schedule("poly", 0.2, 40, power=1.0, warmup=4)  # linear ramp by (t + 1) / 4 on top of the decay
    assert isinstance(w, WarmupLR)
    assert [w(t) for t in range(5)] == pytest.approx([0.2 * (1 - t / 40) * min(1, (t + 1) / 4) for t in range(5)])
    assert w(0) == pytest.approx(0.05) and w(3) == pytest.approx(0.2 * 37 / 40) and w(20) == pytest.approx(0.1)
    assert all(w(t) < w(t + 1) for t in range(3)) and all(w(t) > w(t + 1) for t in range(3, 39))
    c = make_schedule("constant", 0.1, 100, warmup=10)
    assert c(0) == pytest.approx(0.01) and c(9) == c(500) == pytest.approx(0.1)
    assert not isinstance(make_schedule("poly", 0.1, 100, warmup=0), WarmupLR)
    with pytest.raises(ValueError, match="warmup.*-1"):
        make_schedule("poly", 0.1, 100, warmup=-1)
    with pytest.raises(ValueError, match="warmup.*2.5"):
        make_schedule("poly", 0.1, 100, warmup=2.5)
    with pytest.raises(ValueError, match="power.*0"):
        make_schedule("poly", 0.1, 100, power=0)


def test_suggest_lr_relates_sum_and_mean_losses():
    assert suggest_lr("mean", 250_000, mean_lr=1e-2) == 1e-2
    assert suggest_lr("sum", 250_000, mean_lr=1e-2) == pytest.approx(4e-8)
    assert math.isclose(suggest_lr("sum", 500 * 500, mean_lr=2.5e-5), 1e-10)  # the reference's 1e-10
    assert math.isclose(suggest_lr("mean", 500 * 500, sum_lr=1e-10), 2.5e-5)   # and back: the reference as a mean
    assert math.isclose(suggest_lr("sum", 500 * 500, sum_lr=1e-10), 1e-10)
    assert math.isclose(suggest_lr("sum", 128 * 128, mean_lr=0.01), 0.01 / 16384)
    assert suggest_lr("mean", 10) == 1e-2                                            # neither given
    with pytest.raises(ValueError, match="not both"):
        suggest_lr("mean", 10, mean_lr=1e-2, sum_lr=1e-9)
    with pytest.raises(ValueError, match="pixels_per_batch"):
        suggest_lr("sum", 0, mean_lr=1e-2)
    with pytest.raises(ValueError, match="'none'"):
        suggest_lr("none", 10)


@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.9, 5e-4, False), (0.9, 0.0, True), (0.99, 5e-4, True),
                                                            (0.0, 5e-4, False), (0.0, 0.0, False)])
def test_chunked_route_equals_the_textbook_update(momentum, weight_decay, nesterov, monkeypatch):
    """SGD's fast route (in place, in chunks; chunks of 7 here so a parameter spans several)
    against the textbook formula, over three steps with multipliers."""
    import minifcn.optim as optim_module
    from minifcn import route

    monkeypatch.setattr(optim_module, "_CHUNK", 7)
    rng = np.random.default_rng(4)
    start = [rng.standard_normal(shape) for shape in ((3, 5), (11,), (2, 2, 3))]
    grads = [[rng.standard_normal(w.shape) for w in start] for _ in range(3)]
    result = {}
    for mode in ("fast", "textbook"):
        params = [Parameter(w.copy()) for w in start]
        params[1].lr_mult, params[1].decay_mult = 2.0, 0.0
        opt = SGD(params, lr=0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
        with route(mode):
            for step in grads:
                for p, g in zip(params, step):
                    p.grad[...] = g
                opt.step()
        result[mode] = [p.data for p in params] + list(opt.velocity.values())
    for a, b in zip(result["fast"], result["textbook"]):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_a_large_parameters_chunks_are_shared_by_the_threads_with_the_same_bits(monkeypatch):
    """With two threads a parameter of SHARED_UPDATE_BYTES or more is cut into two runs of whole chunks, one per
    thread (about half the elements each); smaller ones stay in the calling thread; the same bits as one thread."""
    import threading

    from minifcn import route

    monkeypatch.setattr(optim_module, "_CHUNK", 8)
    monkeypatch.setattr(optim_module, "SHARED_UPDATE_BYTES", 100 * 4)  # float32: 100 elements or more are cut
    rng = np.random.default_rng(5)
    start = [rng.standard_normal(shape).astype(np.float32) for shape in ((6, 7), (3,), (5, 29), (400,))]
    grads = [[rng.standard_normal(w.shape).astype(np.float32) for w in start] for _ in range(3)]
    real = optim_module._update_chunks
    seen = []

    def recorded(w, *args):
        seen.append((threading.get_ident(), w.size))
        return real(w, *args)

    monkeypatch.setattr(optim_module, "_update_chunks", recorded)
    result = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("MINIFCN_NUM_THREADS", threads)
        seen.clear()
        params = [Parameter(w.copy(), lr_mult=1 + i / 8) for i, w in enumerate(start)]  # a group each
        opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4)
        with route("fast"):  # (the CI's textbook run would take the textbook update)
            for step in grads:
                for p, g in zip(params, step):
                    p.grad[...] = g
                opt.step()
        result[threads] = [p.data for p in params] + list(opt.velocity.values())
        if threads == "2":  # a step: 42 and 3 whole, 145 as 72 + 73, 400 as 200 + 200 (in chunks of 8)
            assert sorted(size for _, size in seen[:6]) == [3, 42, 72, 73, 200, 200], seen[:6]
            assert len(seen) == 3 * 6
            for step in range(3):  # the two runs of a cut parameter on two threads (of the pool, which may be larger)
                pieces = seen[6 * step:6 * step + 6]
                assert len({ident for ident, size in pieces if size in (72, 73)}) == 2, pieces
        else:
            assert len({ident for ident, _ in seen}) == 1 and len(seen) == 3 * len(start)
    for a, b in zip(result["1"], result["2"]):
        np.testing.assert_array_equal(a, b)


def _gap_values(opt):
    """The elements of SGD's flat buffers (data, gradients, momentum) that belong to no parameter."""
    out = []
    for group in opt.groups:
        for flat in (group.data, group.grad, group.velocity):
            covered = np.zeros(flat.size, bool)
            for name, p in group.params:
                for array in (p.data, p.grad, opt.velocity[name]):
                    if np.shares_memory(array, flat):
                        start = (array.ctypes.data - flat.ctypes.data) // flat.itemsize
                        covered[start:start + array.size] = True
            out.append(flat[~covered])
    return np.concatenate(out)


def _fcn_params(dtype, seed=0):
    """A small FCN-8s's parameters with random gradients (weights (1, 1), biases (2, 0); the fixed
    upsampling left out by SGD), as (model, params)."""
    model = FCN8s(num_classes=3, width=1 / 32, dtype=dtype)
    rng = np.random.default_rng(seed)
    for p in model.parameters():
        p.grad[...] = rng.standard_normal(p.shape).astype(dtype)
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,weight_decay,nesterov", [(0.9, 5e-4, False), (0.99, 5e-4, True), (0.0, 0.0, False)])
def test_the_packed_step_gives_the_bits_of_the_per_parameter_step(dtype, momentum, weight_decay, nesterov,
                                                                  monkeypatch):
    """Three steps of the ``packed`` route (one update per group: FCN's weights, its biases) against the
    textbook ``per-parameter`` route on a twin: the same parameters and momentum, bit for bit, in float32
    and float64 (chunks of 64 elements here, so a group spans many and the threads share the larger)."""
    monkeypatch.setattr(optim_module, "_CHUNK", 64)
    models = [_fcn_params(dtype), _fcn_params(dtype)]
    opts = [SGD(m, lr=0.05, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov) for m in models]
    assert len(opts[1].groups) == 2 and sum(len(g.params) for g in opts[1].groups) == len(opts[1].named_params)
    rng = np.random.default_rng(1)
    with routes.route("fast"):
        for _ in range(3):
            for a, b in zip(models[0].parameters(), models[1].parameters()):
                a.grad[...] = b.grad[...] = rng.standard_normal(a.shape).astype(dtype)
            optim_module.step_each_parameter(opts[0])
            optim_module.step_packed(opts[1])
    for (name, a), (_, b) in zip(opts[0].named_params, opts[1].named_params):
        np.testing.assert_array_equal(a.data, b.data, err_msg=name)
        np.testing.assert_array_equal(opts[0].velocity[name], opts[1].velocity[name], err_msg=name)
    gaps = _gap_values(opts[1])
    assert gaps.size and not gaps.any()  # the zeros between parameters stay zeros
    assert any(a.data.std() != 0 for a in models[1].parameters())


def test_sgd_lays_each_group_out_in_flat_buffers_keeping_the_values():
    model = _fcn_params(np.float32)
    before = {name: (p.data.copy(), p.grad.copy()) for name, p in model.named_parameters()}
    opt = SGD(model, lr=0.1)
    for group in opt.groups:
        for name, p in group.params:
            assert np.shares_memory(p.data, group.data) and np.shares_memory(p.grad, group.grad)
            assert np.shares_memory(opt.velocity[name], group.velocity)
            np.testing.assert_array_equal(p.data, before[name][0])
            np.testing.assert_array_equal(p.grad, before[name][1])
        assert group.intact(opt.velocity)
    gaps = _gap_values(opt)
    assert 0 < gaps.size < 3 * 16 * len(opt.named_params) and not gaps.any()  # a few zeros between parameters
    for name, p in model.named_parameters():  # each as aligned as an array of its own
        if p.trainable:
            assert {a.ctypes.data % 64 for a in (p.data, p.grad, opt.velocity[name])} == {0}
    fixed = [p for p in model.parameters() if not p.trainable]
    assert fixed and all(p.data.base is None for p in fixed)  # frozen parameters are left as they are


def _twin_steps(prepare, steps=2):
    """The parameters after ``steps`` steps of the packed route and of the per-parameter route on twins,
    each after ``prepare(model, opt, step)`` (which sets the gradients)."""
    out = []
    for step_fn in (optim_module.step_packed, optim_module.step_each_parameter):
        model = _fcn_params(np.float64)
        opt = SGD(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
        with routes.route("fast"):
            for k in range(steps):
                prepare(model, opt, k)
                step_fn(opt)
        out.append([p.data.copy() for p in model.parameters()])
    return out


def test_a_parameter_whose_array_was_replaced_is_still_updated():
    """An array assigned to ``p.data`` or ``p.grad`` after SGD laid the group out (as Module.to does) takes
    the group off the packed update: its parameters are updated one by one, on their current arrays."""
    def prepare(model, opt, k):
        p = model.conv1_1.weight
        if k == 0:
            p.data = p.data.copy()
            model.conv2_1.bias.grad = model.conv2_1.bias.grad.copy()
        for q in model.parameters():
            q.grad[...] = 0.01 * (k + 1)
    packed, each = _twin_steps(prepare)
    for a, b in zip(packed, each):
        np.testing.assert_array_equal(a, b)


def test_a_multiplier_changed_after_sgd_was_made_is_followed():
    """Changing one parameter's lr_mult (or decay_mult) after SGD grouped it takes its group off the packed
    update, so each parameter is updated with its own multipliers, as the textbook route does."""
    def prepare(model, opt, k):
        if k == 0:
            model.conv2_1.weight.lr_mult = 3.0
            model.conv3_1.bias.decay_mult = 1.0
        for q in model.parameters():
            q.grad[...] = 0.01
    packed, each = _twin_steps(prepare)
    for a, b in zip(packed, each):
        np.testing.assert_array_equal(a, b)


def test_a_lazily_zeroed_gradient_that_no_backward_reached_is_zero_in_the_packed_step():
    """zero_grad's lazy route only marks a gradient zero; the packed update reads the flat buffer, so a
    gradient that no backward pass wrote must be zeroed before it (the stale values must not be used)."""
    def prepare(model, opt, k):
        model.zero_grad()
        grad, overwrite = model.conv1_1.weight.grad_for_backward()  # one "backward" writes one gradient
        grad[...] = 0.5
    packed, each = _twin_steps(prepare)
    for a, b in zip(packed, each):
        np.testing.assert_array_equal(a, b)
    # and against gradients written as zeros by hand: the stale random gradients played no part
    model = _fcn_params(np.float64)
    start = [p.data.copy() for p in model.parameters()]
    opt = SGD(model, lr=0.05, momentum=0.9, weight_decay=0.0)
    for _ in range(2):
        with routes.route("fast"):
            prepare(model, opt, 0)
            optim_module.step_packed(opt)
    for (name, p), w0 in zip(model.named_parameters(), start):
        if name != "conv1_1.weight" and p.trainable:
            np.testing.assert_array_equal(p.data, w0, err_msg=name)


def test_gradients_already_in_someone_elses_buckets_are_left_there():
    """Buckets made before SGD (the distributed gradient average) keep the gradients: SGD does not move
    them, and updates those groups parameter by parameter, with the same result."""
    from minifcn.distributed import GradientBuckets  # noqa: PLC0415

    model = _fcn_params(np.float64)
    buckets = GradientBuckets(model.parameters())
    grads = [p.grad for p in model.parameters() if p.trainable]
    opt = SGD(model, lr=0.05, momentum=0.9)
    assert all(p.grad is g for p, g in zip([p for p in model.parameters() if p.trainable], grads))
    assert not any(group.intact(opt.velocity) for group in opt.groups if len(group.params) > 1)
    assert buckets.buffers()[0] is buckets.buffers_[0]
