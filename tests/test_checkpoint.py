"""Checkpoints (minifcn/checkpoint.py): round trip, atomic saves, no unpickling,
clear errors for missing or damaged files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from minifcn.backend import device_of, to_device
from minifcn.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, split_prefix


def sample():
    rng = np.random.default_rng(0)
    arrays = {"model.conv1_1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "model.conv1_1.bias": rng.standard_normal(4),
              "optim.momentum.conv1_1.weight": np.zeros((4, 3, 3, 3), np.float32),
              "counts": np.arange(5, dtype=np.int64)}
    meta = {"epoch": 3, "config": {"lr": 0.02, "model": "fcn8s", "crop_size": None}, "history": [{"mean_iu": 0.5}],
            "name": "café ✓"}
    return arrays, meta


def test_round_trip(tmp_path, device):
    """Arrays saved from either device come back as NumPy arrays, bit for bit."""
    arrays, meta = sample()
    path = tmp_path / "sub" / "ckpt.npz"  # the folder is created
    on_device = {k: to_device(v, device) for k, v in arrays.items()}
    assert {device_of(v) for v in on_device.values()} == {device}
    assert save_checkpoint(path, on_device, meta) == str(path)
    loaded, meta2 = load_checkpoint(path)
    assert meta2 == meta
    assert sorted(loaded) == sorted(arrays)
    for k, v in arrays.items():
        assert loaded[k].dtype == v.dtype
        np.testing.assert_array_equal(loaded[k], v)
    assert sorted(split_prefix(loaded, "model")) == ["conv1_1.bias", "conv1_1.weight"]
    assert list(split_prefix(loaded, "optim")) == ["momentum.conv1_1.weight"]
    assert os.listdir(tmp_path / "sub") == ["ckpt.npz"]  # no temporary left behind


def test_meta_key_is_reserved(tmp_path):
    with pytest.raises(ValueError, match="__meta__"):
        save_checkpoint(tmp_path / "c.npz", {"__meta__": np.zeros(1)})


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A crash in the middle of writing (here: after part of the archive is written) leaves
    the previous file byte for byte, and no temporary file."""
    arrays, meta = sample()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, arrays, meta)
    before = path.read_bytes()

    def crash(f, **kw):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"other": np.ones(3)}, {"epoch": 4})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["epoch"] == 3


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """KeyboardInterrupt (Ctrl-C) during a save, too."""
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, {"a": np.zeros(2)}, {"epoch": 1})
    before = path.read_bytes()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"a": np.ones(2)}, {"epoch": 2})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["ckpt.npz"]


def test_loading_never_unpickles(tmp_path):
    marker = tmp_path / "code-was-run"

    class Payload:
        def __reduce__(self):  # unpickling this would create the marker file
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    np.savez(path, __meta__=np.frombuffer(b"{}", np.uint8), weights=np.array([Payload()], dtype=object))
    with pytest.raises(CheckpointError, match="evil.npz") as err:
        load_checkpoint(path)
    assert isinstance(err.value, ValueError)  # CheckpointError is a ValueError
    assert not marker.exists()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.npz"
    with pytest.raises(CheckpointError, match="nope.npz.*does not exist"):
        load_checkpoint(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(CheckpointError, match="garbage.npz.*corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.9])
def test_truncated_file(tmp_path, keep):
    arrays, meta = sample()
    path = tmp_path / "trunc.npz"
    save_checkpoint(path, arrays, meta)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="trunc.npz"):
        load_checkpoint(path)


def test_flipped_bytes_inside_an_array(tmp_path):
    """Damage in the middle of a stored array is caught by the zip CRC, not returned as data."""
    arrays = {"w": np.zeros(10_000)}
    path = tmp_path / "flip.npz"
    save_checkpoint(path, arrays, {"epoch": 0})
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="flip.npz"):
        load_checkpoint(path)


def test_npz_without_metadata_or_with_bad_metadata(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, w=np.zeros(3))
    with pytest.raises(CheckpointError, match="plain.npz.*__meta__"):
        load_checkpoint(plain)
    bad = tmp_path / "bad.npz"
    np.savez(bad, __meta__=np.frombuffer(b"{not json", np.uint8))
    with pytest.raises(CheckpointError, match="bad.npz.*metadata"):
        load_checkpoint(bad)


def test_checkpoint_gets_ordinary_file_permissions(tmp_path):
    """The temporary file of an atomic save is created 0600; the checkpoint must not stay so."""
    import os  # noqa: PLC0415

    from minifcn.checkpoint import save_checkpoint  # noqa: PLC0415

    umask = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "c.npz", {"a": np.zeros(2)})
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_random_file_is_not_called_pickled_data(tmp_path, seed):
    """NumPy reads a file that is neither .npz nor .npy as a pickle, and its error advises allow_pickle=True:
    the message must say what the file is not, and never suggest unpickling."""
    path = tmp_path / "random.npz"
    path.write_bytes(np.random.default_rng(seed).bytes(5000))
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert "not an .npz archive" in str(err.value) and "pickle" not in str(err.value).lower()


def test_first_nonfinite_names_the_first_bad_array():
    from minifcn.checkpoint import first_nonfinite  # noqa: PLC0415
    arrays = {"a": np.ones(3), "n": np.arange(3), "b": np.array([1.0, np.inf, np.nan]), "c": np.array([np.nan])}
    assert first_nonfinite(arrays) == ("b", 2)
    assert first_nonfinite({"a": np.ones(2, np.float32)}) is None
