"""Data-parallel training (minifcn/distributed.py): the same SGD on N processes as on one.

Without MPI: the stand-in's operations, gradient buckets, the loss normalisation
over a global batch, sharded loading, the mismatch message. With MPI (marked
``mpi``; skipped with the reason where mpi4py or an MPI runtime is missing):
``mpiexec -n 2 minifcn train`` against one process on the same images, faults,
mismatched launches.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minifcn.checkpoint import load_checkpoint
from minifcn.data import DataLoader, get_dataset
from minifcn.distributed import (LAUNCHER_SIZE_VARIABLES, GradientBuckets, SingleProcess, global_loss, launched_size,
                                 mismatch_message, world)
from minifcn.layers import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from minifcn.models import build_model

ROOT = Path(__file__).resolve().parent.parent


# -- without MPI ---------------------------------------------------------------------------

def test_world_is_the_stand_in_without_a_launcher(monkeypatch):
    for name in LAUNCHER_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert launched_size() is None
    comm = world()
    assert isinstance(comm, SingleProcess) and (comm.rank, comm.size) == (0, 1)
    a = np.arange(4.0)
    assert comm.allreduce_sum_(a) is a and comm.broadcast_object({"x": 1}) == {"x": 1}
    assert comm.gradient_averager([]).nbytes == 0
    monkeypatch.setenv("PMI_SIZE", "1")  # a launcher's single rank is a single process too
    assert launched_size() is None
    monkeypatch.setenv("PMI_SIZE", "3")
    assert launched_size() == ("PMI_SIZE", 3)


def test_importing_minifcn_never_imports_mpi4py():
    code = ("import sys, minifcn, minifcn.train, minifcn.cli, minifcn.distributed as d; d.world(); "
            "print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_SIZE_VARIABLES}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_a_launch_without_mpi4py_says_what_to_install(tmp_path):
    """A process started as one of 2 ranks where mpi4py cannot be imported stops with the install line
    (instead of training alone and writing the same run folder as the other rank)."""
    blocker = tmp_path / "mpi4py"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('mpi4py hidden by the test')\n")
    env = dict(os.environ, PMI_SIZE="2", PYTHONPATH=f"{tmp_path}{os.pathsep}{ROOT}")
    out = subprocess.run([sys.executable, "-m", "minifcn", "train", "--out", str(tmp_path / "run"), "--epochs", "1"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "pip install 'minifcn[mpi]'" in out.stderr and "PMI_SIZE=2" in out.stderr
    assert not (tmp_path / "run").exists()


def _params(shapes, rng, trainable=None):
    from minifcn import Parameter

    params = []
    for i, shape in enumerate(shapes):
        p = Parameter(rng.standard_normal(shape), trainable=True if trainable is None else trainable[i])
        p.grad[...] = rng.standard_normal(shape)
        params.append(p)
    return params


def test_gradient_buckets_hold_every_trainable_gradient_and_skip_frozen(rng):
    params = _params([(4, 3, 3, 3), (4,), (5, 4, 1, 1), (5,), (7, 7)], rng, trainable=[True, True, False, True, True])
    before = [p.grad.copy() for p in params]
    buckets = GradientBuckets(params, bucket_bytes=8 * 115)  # 115 float64 per bucket
    sizes = [b.size for b in buckets.buffers()]
    assert sizes == [108 + 4, 5 + 49]  # frozen (5, 4, 1, 1) left out; a new bucket where the cap would be passed
    assert buckets.nbytes == 8 * sum(sizes)
    for p, g in zip(params, before):
        np.testing.assert_array_equal(p.grad, g)  # values kept
    frozen = params[2]
    assert not any(np.shares_memory(frozen.grad, b) for b in buckets.buffers())
    params[0].grad += 1.0  # backward's += writes into the bucket
    np.testing.assert_array_equal(buckets.buffers()[0][:108], (before[0] + 1.0).ravel())
    params[3].grad = np.full(5, 7.0)  # replaced: copied back in and attached again
    np.testing.assert_array_equal(buckets.buffers()[1][:5], np.full(5, 7.0))
    assert np.shares_memory(params[3].grad, buckets.buffers()[1])
    with pytest.raises(ValueError, match="bucket_bytes"):
        GradientBuckets(params, bucket_bytes=0)


def test_gradient_buckets_reduce_the_flat_gradients_sgd_laid_out_where_they_are(rng):
    """SGD made first (as training does) lays the gradients out in one flat buffer per dtype, group after
    group; the buckets take that buffer as it is (cut at bucket_bytes) and move no gradient, so a step is
    still one exchange however many groups there are."""
    from minifcn.optim import SGD  # noqa: PLC0415

    params = _params([(4, 3, 3, 3), (4,), (5, 4, 1, 1), (5,), (7, 7)], rng)
    for p in params[1::2]:
        p.lr_mult, p.decay_mult = 2.0, 0.0  # biases: a group of two
    params[4].lr_mult = 0.5                 # alone in its group
    opt = SGD(params, lr=0.1)
    grads = [p.grad for p in params]
    buckets = GradientBuckets(params, bucket_bytes=8 * 100)
    assert all(p.grad is g for p, g in zip(params, grads))  # SGD's views stay
    whole = opt.groups[0].grad.base
    assert all(group.grad.base is whole for group in opt.groups)
    # float64, each gradient on a 64-byte boundary (8 elements): weights at 0 and 112 (108 + 4 zeros), the
    # biases' group at 136 (4 at 136, 5 at 144), the last at 152: 201 elements from the first to the end
    assert [b.size for b in buckets.buffers()] == [100, 100, 1] and all(b.base is whole for b in buckets.buffers())
    assert buckets.nbytes == 8 * 201
    params[1].grad[...] = 3.0  # backward writes into SGD's buffer, which is the bucket
    np.testing.assert_array_equal(buckets.buffers()[1][136 - 100:140 - 100], 3.0)
    assert all(group.intact(opt.velocity) for group in opt.groups)


def test_gradient_buckets_split_by_dtype(rng):
    params = _params([(3,), (2,), (4,)], rng)
    params[1].data, params[1].grad = params[1].data.astype(np.float32), params[1].grad.astype(np.float32)
    buckets = GradientBuckets(params)
    assert [(b.dtype, b.size) for b in buckets.buffers()] == [(np.float64, 3), (np.float32, 2), (np.float64, 4)]


class RankGroup(SingleProcess):
    """N ranks simulated in one process for the arithmetic of :func:`global_loss`: ``allreduce_sum`` returns
    the totals the real MPI sum would give (set by the test from every rank's loss layer)."""

    def __init__(self, size, totals):
        self.size, self.totals = size, totals

    def allreduce_sum(self, array):
        return np.array(self.totals, dtype=np.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_kind", ["softmax", "softmax-class-weight", "sigmoid"])
def test_global_loss_gives_the_whole_batch_loss_and_gradient(loss_kind, reduction, rng):
    """Two ranks with unequal numbers of ignored pixels (and one rank with none counted at all in the
    sigmoid case): the loss and the average of the ranks' scaled gradients equal one process's on both."""
    c = 1 if loss_kind == "sigmoid" else 3
    logits = rng.standard_normal((2, c, 4, 5))
    labels = rng.integers(0, max(c, 2), (2, 4, 5))
    labels[0, :3] = 255                        # 15 of image 0's 20 pixels ignored, none of image 1's
    if loss_kind == "sigmoid":
        labels[0] = 255                        # rank 0 counts no pixel at all

    def make():
        if loss_kind == "sigmoid":
            return SigmoidBinaryCrossEntropy(reduction=reduction)
        return SoftmaxCrossEntropy(reduction=reduction,
                                   class_weight=[0.5, 2.0, 1.0] if loss_kind == "softmax-class-weight" else None)

    whole = make()
    expected_loss = whole(logits, labels)
    expected_grad = whole.backward()
    ranks = [make() for _ in range(2)]
    for r, fn in enumerate(ranks):
        fn(logits[r:r + 1], labels[r:r + 1])
    totals = [sum(fn.loss_sum for fn in ranks), sum(fn.count for fn in ranks)]
    grads = []
    for fn in ranks:
        loss, scale = global_loss(RankGroup(2, totals), fn)
        assert loss == pytest.approx(expected_loss, rel=1e-13)
        grads.append(fn.backward(scale))
    averaged = np.concatenate(grads) / 2  # each rank's parameter gradients are linear in its dlogits
    np.testing.assert_allclose(averaged, expected_grad, rtol=1e-13, atol=1e-16)
    if reduction == "mean" and loss_kind != "sigmoid":  # the naive mean of the ranks' means is different
        naive = np.mean([fn.loss_sum / fn.count for fn in ranks])
        assert abs(naive - expected_loss) > 1e-3


def test_global_loss_of_a_batch_with_nothing_counted():
    fn = SoftmaxCrossEntropy()
    fn(np.zeros((1, 2, 2, 2)), np.full((1, 2, 2), 255))
    assert global_loss(SingleProcess(), fn) == (0.0, 0.0)


@pytest.mark.parametrize("shuffle,crop,n,b,shards", [(True, 12, 11, 2, 2), (True, None, 12, 1, 3), (False, None, 7, 2, 2)])
def test_shards_together_are_the_unsharded_loader(shuffle, crop, n, b, shards):
    """Each global batch of shards x b samples, cut into the shards' parts, is the unsharded batch of that
    size: same images (crops and flips included), same labels. An empty part of a last batch is skipped."""
    dataset = get_dataset("shapes", split="train", num_images=n, image_size=16, seed=5)
    kw = dict(shuffle=shuffle, seed=9, crop_size=crop, flip=True, drop_last=shuffle)
    whole = DataLoader(dataset, b * shards, **kw)
    parts = [DataLoader(dataset, b, num_shards=shards, shard=r, **kw) for r in range(shards)]
    assert all(len(p) == len(whole) for p in parts)
    for epoch in (0, 3):
        per_shard = [list(p.epoch(epoch)) for p in parts]
        for step, (images, labels) in enumerate(whole.epoch(epoch)):
            pieces = [batches[step] for batches in per_shard if step < len(batches)]
            np.testing.assert_array_equal(np.concatenate([x for x, _ in pieces]), images)
            np.testing.assert_array_equal(np.concatenate([y for _, y in pieces]), labels)
    if not shuffle:  # 7 samples in global batches of 4: the last one (3 samples) gives shard 1 one, shard 0 two
        assert [len(list(p.epoch(0))) for p in parts] == [2, 2]
        assert [x.shape[0] for x, _ in parts[1].epoch(0)] == [2, 1]
    with pytest.raises(ValueError, match="shard"):
        DataLoader(dataset, 1, num_shards=2, shard=2)


def test_mismatch_message_names_rank_key_and_values():
    ok = {"config": {"width": 0.125, "lr": 0.01}, "parameters": {"conv1.weight": "(8, 3, 3, 3) float32"}}
    assert mismatch_message([ok, ok, ok]) is None
    other = {"config": {"width": 0.25, "lr": 0.01}, "parameters": {"conv1.weight": "(16, 3, 3, 3) float32"}}
    message = mismatch_message([ok, ok, other])
    assert "the 3 ranks of this job disagree" in message
    assert "rank 2 has config.width = 0.25 where rank 0 has 0.125" in message
    assert "rank 2 has parameters.conv1.weight = '(16, 3, 3, 3) float32' where rank 0 has '(8, 3, 3, 3) float32'" \
        in message
    assert "rank 1" not in message


# -- with MPI --------------------------------------------------------------------------------

def _mpiexec():
    """The mpiexec beside this Python (the mpich wheel's) or on PATH, or None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.is_file() else shutil.which("mpiexec")


def _subprocess_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "MV2_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["MINIFCN_NUM_THREADS"] = "1"  # two ranks on a small machine: one band thread each
    return env


_PROBE = {}


def mpi_skip_reason():
    """None when ``mpiexec -n 2`` runs two ranks of this Python with mpi4py; else why not."""
    if "reason" not in _PROBE:
        reason = None
        if importlib.util.find_spec("mpi4py") is None:
            reason = "mpi4py is not installed (pip install -e '.[mpi]')"
        elif _mpiexec() is None:
            reason = "no MPI runtime: mpiexec is neither beside this Python nor on PATH (pip install -e '.[mpi]')"
        else:
            code = ("from mpi4py import MPI; c = MPI.COMM_WORLD; total = c.allreduce(1)\n"
                    "if c.Get_rank() == 0: print(total, c.Get_size())")  # one rank prints: no interleaved lines
            try:
                out = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-c", code], env=_subprocess_env(),
                                     capture_output=True, text=True, timeout=60)
                if out.returncode != 0 or out.stdout.split()[:2] != ["2", "2"]:
                    reason = f"mpiexec -n 2 does not run an MPI job here: {(out.stderr or out.stdout).strip()[:300]}"
            except (OSError, subprocess.TimeoutExpired) as exc:
                reason = f"mpiexec -n 2 does not run here: {exc}"
        _PROBE["reason"] = reason
    return _PROBE["reason"]


@pytest.fixture
def mpi():
    """``mpi(args, ranks=2)``: run ``mpiexec -n ranks <args>`` and return (completed process, seconds).
    Skips where MPI is missing; fails instead where ``MINIFCN_REQUIRE_MPI=1`` (CI, after installing the extra)."""
    reason = mpi_skip_reason()
    if reason and os.environ.get("MINIFCN_REQUIRE_MPI") == "1":
        pytest.fail(f"MINIFCN_REQUIRE_MPI=1 but {reason}")
    if reason:
        pytest.skip(reason)

    def run(args, ranks=2, timeout=240):
        start = time.perf_counter()
        out = subprocess.run([_mpiexec(), "-n", str(ranks), *args], cwd=ROOT, env=_subprocess_env(),
                             capture_output=True, text=True, timeout=timeout)
        return out, time.perf_counter() - start

    return run


def write_dataset(root, train_images=6, val_images=3, size=32, seed=0):
    """A folder dataset of ``size`` x ``size`` images, 3 classes, and masks with 255 (ignored) pixels in
    unequal numbers per image: image i of a split has a (3 + 4 i)-row band ignored (one train image
    entirely), so the ranks of one global batch count different numbers of pixels."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", train_images), ("val", val_images)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(n):
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            mask = np.zeros((size, size), np.uint8)
            mask[:, size // 3:] = 1
            mask[size // 2:, size // 2:] = 2
            image[mask == 1] //= 2  # the classes are visible in the image
            mask[:3 + 4 * i] = 255
            if split == "train" and i == 3:
                mask[:] = 255
            Image.fromarray(image).save(root / split / "images" / f"{i:02d}.png")
            Image.fromarray(mask, mode="L").save(root / split / "masks" / f"{i:02d}.png")
    return root


def train_args(data, out, model, batch, *extra):
    return [sys.executable, "-m", "minifcn", "train", "--dataset", "folder", "--data-dir", str(data), "--out", str(out),
            "--model", model, "--width", "0.0625", "--batch-size", str(batch), "--epochs", "1", "--dtype", "float64",
            "--lr", "0.05", "--no-progress", "--ranks", "1", *extra]  # one process each: mpiexec's -n gives the ranks


def read_metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def nan_equal(a, b, rel):
    if a is None or b is None:  # NaN is written as null
        return a is None and b is None
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-300)


COLLECTIVES = """
import numpy as np
from minifcn import Parameter
from minifcn.distributed import LaunchMismatch, MPICommunicator, world

comm = world()
assert isinstance(comm, MPICommunicator) and comm.size == 2, comm
r = comm.rank

# broadcast: every rank ends with rank 0's values, whatever the dtype
arrays = [np.full((2, 3), 10.0 + r), np.full(4, r, np.int64), np.full(5, 0.5 + r, np.float32)]
comm.broadcast_arrays(arrays)
assert all((a == b).all() for a, b in zip(arrays, [np.full((2, 3), 10.0), np.zeros(4), np.full(5, 0.5)]))
assert comm.broadcast_object({"rank": r}) == {"rank": 0}

# sums: a confusion matrix (int64, in place) and the loss totals (a copy)
matrix = np.arange(9, dtype=np.int64).reshape(3, 3) * (r + 1)
assert comm.allreduce_sum_(matrix) is matrix and (matrix == 3 * np.arange(9).reshape(3, 3)).all()
totals = np.array([1.5, 2.0 + r])
assert (comm.allreduce_sum(totals) == [3.0, 5.0]).all() and totals[1] == 2.0 + r

# gradient averages: both routes give the mean of the ranks' gradients; a frozen gradient is not touched
def params():
    shapes = [(4, 3, 3, 3), (4,), (6, 4, 1, 1), (6,), (3, 6, 3, 3)]
    out = [Parameter(np.zeros(s), trainable=(i != 2)) for i, s in enumerate(shapes)]
    for i, p in enumerate(out):
        p.grad[...] = (r + 1) * np.arange(p.size).reshape(p.shape) + i
    return out

for route, cap in (("buckets", 8 * 150), ("buckets", 1 << 30), ("per-parameter", 1)):
    ps = params()
    average = comm.gradient_averager(ps, route, cap)
    if route == "buckets":
        assert len(average.buckets.buffers()) == (2 if cap < 1 << 20 else 1), len(average.buckets.buffers())
    average()
    for i, p in enumerate(ps):
        expected = (r + 1) * np.arange(p.size).reshape(p.shape) + i if i == 2 else \
            1.5 * np.arange(p.size).reshape(p.shape) + i
        assert (p.grad == expected).all(), (route, i)

# start-up check: equal descriptions pass, different ones raise on every rank
comm.check_same({"width": 0.125, "data": [1, 2]})
try:
    comm.check_same({"width": 0.125 * (r + 1)})
    raise AssertionError("no LaunchMismatch")
except LaunchMismatch as exc:
    assert "rank 1 has width = 0.25 where rank 0 has 0.125" in str(exc), exc
ranks = comm.comm.gather(r, root=0)
if r == 0:
    print("ok", *ranks)
"""


@pytest.mark.mpi
def test_collectives_on_two_ranks(mpi, tmp_path):
    """The communicator's operations under mpiexec -n 2: broadcasts, sums, both gradient routes (the
    buckets at two caps and one call per parameter) give the mean, frozen gradients untouched, the
    start-up check."""
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    out, _ = mpi([sys.executable, str(script)], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "0", "1"]


@pytest.mark.mpi
@pytest.mark.parametrize("model", ["fcn8s", "encoder-decoder"])
def test_two_ranks_of_batch_1_take_the_steps_of_one_process_of_batch_2(model, mpi, tmp_path):
    """Same images (flipped alike), 3 SGD steps with momentum and weight decay in float64: the same
    parameters and momentum to 1e-10, the same epoch loss, the same metrics from the sharded evaluation."""
    data = write_dataset(tmp_path / "data")
    one = subprocess.run(train_args(data, tmp_path / "one", model, 2), cwd=ROOT, env=_subprocess_env(),
                         capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two, _ = mpi(train_args(data, tmp_path / "two", model, 1))
    assert two.returncode == 0, two.stderr
    assert "2 ranks x batch 1" in two.stdout
    assert two.stdout.count("epoch 1/1:") == 1  # rank 0 alone logs
    arrays_one, meta_one = load_checkpoint(tmp_path / "one" / "checkpoint.npz")
    arrays_two, meta_two = load_checkpoint(tmp_path / "two" / "checkpoint.npz")
    assert sorted(arrays_one) == sorted(arrays_two)
    moved = 0
    initial = build_model(model, num_classes=3, width=0.0625, dtype=np.float64)
    initial = {f"model.{k}": v for k, v in initial.state_dict().items()}
    for name, a in arrays_one.items():
        b = arrays_two[name]
        assert a.dtype == np.float64
        scale = max(float(np.abs(a).max()), 1e-300)
        assert float(np.abs(a - b).max()) / scale <= 1e-10, name
        moved += name in initial and not np.array_equal(a, initial[name])
    assert moved > 5  # the steps did change the parameters
    assert meta_one["epoch"] == meta_two["epoch"] == 0
    row_one, = read_metrics(tmp_path / "one")
    row_two, = read_metrics(tmp_path / "two")
    assert nan_equal(row_one["train_loss"], row_two["train_loss"], 1e-10)
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"):
        assert nan_equal(row_one[key], row_two[key], 1e-12), key
    assert all(nan_equal(a, b, 1e-12) for a, b in zip(row_one["per_class_iu"], row_two["per_class_iu"]))
    assert row_two["pixel_acc"] is not None and 0 < row_two["pixel_acc"] <= 1
    for picture in ("loss.png", "predictions.png"):
        assert (tmp_path / "two" / picture).is_file()


FAULTY = """
import sys
from minifcn import cli, train
from minifcn.distributed import world

FAIL_RANK, KIND = int(sys.argv[1]), sys.argv[2]
make_datasets = train.make_datasets


class FailsInEpoch2:
    # The training set of the failing rank: its first read in epoch 2 raises (after the dataset check read
    # every sample once and epoch 1 read this rank's 3).
    def __init__(self, dataset):
        self.dataset, self.reads = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > len(self.dataset) + 3:
            if KIND == "uncaught":
                raise ZeroDivisionError(f"a bug met on rank {FAIL_RANK} at sample {i}")
            raise OSError(f"image {i} is corrupt on rank {FAIL_RANK}'s disk")
        return self.dataset[i]


def faulty_datasets(cfg):
    train_set, val_set = make_datasets(cfg)
    return (FailsInEpoch2(train_set) if world().rank == FAIL_RANK else train_set), val_set


train.make_datasets = faulty_datasets
sys.exit(cli.main(sys.argv[3:]))
"""


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["error", "uncaught"])
def test_a_failing_rank_stops_the_job_and_the_last_checkpoint_survives(kind, mpi, tmp_path):
    """Rank 1 fails at its first image of epoch 2 while rank 0 waits in the gradient allreduce: the whole
    job ends within 30 s, non-zero, with rank 1's message; the checkpoint of epoch 1 is intact."""
    data = write_dataset(tmp_path / "data")
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY)
    args = train_args(data, tmp_path / "run", "encoder-decoder", 1)
    args[args.index("--epochs") + 1] = "2"
    out, seconds = mpi([sys.executable, str(script), "1", kind, *args[3:]], timeout=120)
    assert out.returncode != 0
    assert seconds < 30, f"the job took {seconds:.0f} s to stop"
    if kind == "error":
        assert "rank 1 of 2: error: image" in out.stderr and "is corrupt on rank 1's disk" in out.stderr
        assert out.returncode == 2
    else:
        assert "ZeroDivisionError: a bug met on rank 1" in out.stderr
        assert "rank 1 of 2: uncaught ZeroDivisionError; stopping every rank" in out.stderr
    arrays, meta = load_checkpoint(tmp_path / "run" / "checkpoint.npz")
    assert meta["epoch"] == 0 and len(meta["history"]) == 1
    assert read_metrics(tmp_path / "run") == meta["history"]
    assert not [p for p in os.listdir(tmp_path / "run") if p.startswith(".")]  # no half-written temporary left


@pytest.mark.mpi
def test_resume_under_mpi_continues_as_one_process_would(mpi, tmp_path):
    """Two ranks train one epoch, then resume for a second (rank 0 reads the checkpoint and sends it to
    rank 1): the same parameters as one process training two epochs straight on batch 2."""
    data = write_dataset(tmp_path / "data")
    straight = train_args(data, tmp_path / "one", "encoder-decoder", 2, "--schedule", "constant")
    straight[straight.index("--epochs") + 1] = "2"
    one = subprocess.run(straight, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    first = train_args(data, tmp_path / "two", "encoder-decoder", 1, "--schedule", "constant")
    out, _ = mpi(first)
    assert out.returncode == 0, out.stderr
    resumed = list(first)
    resumed[resumed.index("--epochs") + 1] = "2"
    out, _ = mpi(resumed + ["--resume"])
    assert out.returncode == 0, out.stderr
    assert "resuming from" in out.stdout
    a, meta_a = load_checkpoint(tmp_path / "one" / "checkpoint.npz")
    b, meta_b = load_checkpoint(tmp_path / "two" / "checkpoint.npz")
    assert meta_a["epoch"] == meta_b["epoch"] == 1
    for name in a:
        scale = max(float(np.abs(a[name]).max()), 1e-300)
        assert float(np.abs(a[name] - b[name]).max()) / scale <= 1e-10, name
    assert len(read_metrics(tmp_path / "two")) == 2


@pytest.mark.mpi
def test_eval_under_mpi_scores_each_image_once_and_rank_0_prints(mpi, tmp_path):
    """``mpiexec -n 2 minifcn eval``: the ranks score their shards of the 3 held-out images (2 + 1), rank 0
    prints one JSON line, and the scores are the single process's."""
    data = write_dataset(tmp_path / "data")
    trained = subprocess.run(train_args(data, tmp_path / "run", "encoder-decoder", 2), cwd=ROOT,
                             env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert trained.returncode == 0, trained.stderr
    command = [sys.executable, "-m", "minifcn", "eval", "--checkpoint", str(tmp_path / "run" / "checkpoint.npz"),
               "--json"]
    one = subprocess.run(command, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two, _ = mpi(command)
    assert two.returncode == 0, two.stderr
    lines = [line for line in two.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, two.stdout
    a, b = json.loads(one.stdout), json.loads(lines[0])
    for key in ("pixel_acc", "mean_acc", "mean_iu", "fwiu"):
        assert nan_equal(a[key], b[key], 1e-12), key
    assert all(nan_equal(x, y, 1e-12) for x, y in zip(a["per_class_iu"], b["per_class_iu"]))


@pytest.mark.mpi
def test_predict_under_mpi_writes_each_image_once_and_rank_0_prints_in_order(mpi, tmp_path):
    """``mpiexec -n 2 minifcn predict`` on 3 images: one line per image, in input order, and the files of
    a single process, pixel for pixel."""
    data = write_dataset(tmp_path / "data")
    trained = subprocess.run(train_args(data, tmp_path / "run", "encoder-decoder", 2), cwd=ROOT,
                             env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    assert trained.returncode == 0, trained.stderr
    images = [str(p) for p in sorted((data / "val" / "images").iterdir())]
    outputs = {}
    for label in ("one", "two"):
        command = [sys.executable, "-m", "minifcn", "predict", "--checkpoint",
                   str(tmp_path / "run" / "checkpoint.npz"), "--out", str(tmp_path / label), *images]
        done = (subprocess.run(command, cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True,
                               timeout=240) if label == "one" else mpi(command)[0])
        assert done.returncode == 0, done.stderr
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert [line.split(" -> ")[0] for line in lines] == images, done.stdout
        outputs[label] = {name: np.asarray(Image.open(tmp_path / label / name))
                          for name in sorted(os.listdir(tmp_path / label))}
    assert list(outputs["one"]) == list(outputs["two"]) and len(outputs["one"]) == 3
    assert all(np.array_equal(outputs["one"][k], outputs["two"][k]) for k in outputs["one"])


@pytest.mark.mpi
def test_ranks_started_with_different_widths_are_refused_at_start_up(mpi, tmp_path):
    data = write_dataset(tmp_path / "data")
    narrow = train_args(data, tmp_path / "run", "encoder-decoder", 1)
    wide = list(narrow)
    wide[wide.index("--width") + 1] = "0.125"
    out, seconds = mpi([*narrow, ":", "-n", "1", *wide], ranks=1, timeout=120)
    assert out.returncode == 2
    assert "the 2 ranks of this job disagree" in out.stderr
    assert "rank 1 has config.width = 0.125 where rank 0 has 0.0625" in out.stderr
    assert "parameters.conv1.weight" in out.stderr  # the model sizes differ too
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


@pytest.mark.mpi
def test_bench_distributed_prints_its_tables(mpi):
    """benchmarks/bench_distributed.py, both parts at a toy size: the three step rows and the routes."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_distributed.py"), "--steps", "1",
                          "--warmup", "1", "--image-size", "32", "--rounds", "1", "--widths", "0.0625"],
                         cwd=ROOT, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("machine: ")
    steps = [line for line in lines if line.startswith(("1 process", "2 ranks"))]
    assert [s.split()[:4] for s in steps] == [["1", "process,", "batch", "1"], ["1", "process,", "batch", "2"],
                                              ["2", "ranks", "x", "batch"]]
    assert float(steps[2].split()[-1]) > 0  # bytes reduced per step by the 2 ranks
    routes = [line for line in lines if line.startswith("width 0.0625") and "GB" not in line]
    assert len(routes) == 3 + 2  # three routes, then two rows of the between-machines table


def test_ranks_draw_their_own_dropout_masks():
    """Rank r > 0 reseeds each Dropout from (seed, rank, epoch): ranks differ, a (rank, epoch) repeats."""
    from minifcn.train import _rank_dropout_streams  # noqa: PLC0415

    def masks(rank, epoch):
        model = build_model("fcn8s", num_classes=2, width=1 / 32, dropout=0.5)
        _rank_dropout_streams(model, seed=0, rank=rank, epoch=epoch)
        return [m.rng.random(8) for _, m in model.named_modules() if type(m).__name__ == "Dropout"]

    first, second, again, later = masks(1, 0), masks(2, 0), masks(1, 0), masks(1, 3)
    assert len(first) == 2  # drop6, drop7
    assert all((a == b).all() for a, b in zip(first, again))
    assert not any((a == b).all() for a, b in zip(first, second))
    assert not any((a == b).all() for a, b in zip(first, later))
    assert not (first[0] == first[1]).all()  # and the two layers differ from each other


class _TwoRankSums(SingleProcess):
    """Rank 0 of two whose partner's numbers are ``partner`` (its count, then its loss sum and next count)."""

    size = 2

    def __init__(self, partner):
        self.partner = list(partner)

    def allreduce_sum(self, array):
        mine = np.asarray(array, dtype=np.float64)
        return mine + np.asarray(self.partner.pop(0), dtype=np.float64)


def test_step_loss_gives_global_loss_with_the_counts_one_step_ahead(rng):
    """Two steps of rank 0 of two: StepLoss's scale and loss equal global_loss's on the same numbers, the
    second step's count taken from what travelled with the first step's gradients (no sum of its own);
    a count_of that disagrees with the forward's count is refused, naming both."""
    from minifcn.distributed import StepLoss  # noqa: PLC0415

    fn = SoftmaxCrossEntropy(class_weight=[0.5, 2.0, 1.0])
    batches = [(rng.standard_normal((1, 3, 4, 5)), rng.integers(0, 3, (1, 4, 5))) for _ in range(2)]
    partner = [(7.25, 30.5), (9.5, 12.0)]  # the other rank's (loss sum, count) at each step
    comm = _TwoRankSums([[partner[0][1]]])
    step = StepLoss(comm, fn, lambda labels: fn.count_of(labels, (1, 3, 4, 5), np.float64))
    for t, (logits, labels) in enumerate(batches):
        fn(logits, labels)
        expected = global_loss(RankGroup(2, [fn.loss_sum + partner[t][0], fn.count + partner[t][1]]), fn)
        assert step.scale(labels) == expected[1]
        values = step.values(batches[1][1] if t == 0 else None)
        sums = np.add(values, [partner[t][0], partner[t + 1][1] if t == 0 else 0.0])  # what the average returns
        assert step.loss(sums) == expected[0]
    assert comm.partner == []  # the second step's count came with the first step's values
    step = StepLoss(SingleProcess(), fn, lambda labels: 99.0)
    fn(*batches[0])
    assert step.scale(batches[0][1]) == 1.0  # one process: nothing counted ahead
    step = StepLoss(_TwoRankSums([[1.0]]), fn, lambda labels: 99.0)
    with pytest.raises(RuntimeError, match=r"the loss counted 2\d.* pixels where its count_of gave 99.0"):
        step.scale(batches[0][1])
