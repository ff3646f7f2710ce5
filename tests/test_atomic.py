"""atomic_write: all or nothing under the target name, ordinary permissions."""
from __future__ import annotations

import os

import pytest

from minifcn.atomic import atomic_write


def test_writes_and_creates_folders(tmp_path):
    path = atomic_write(tmp_path / "a" / "b.bin", lambda f: f.write(b"new"))
    assert open(path, "rb").read() == b"new"
    assert os.listdir(tmp_path / "a") == ["b.bin"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "b.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["b.bin"]


def test_permissions_follow_the_umask(tmp_path):
    umask = os.umask(0o027)
    try:
        path = atomic_write(tmp_path / "c.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_atomic_write_all_replaces_all_or_none(tmp_path):
    """Two files that must agree: when the second cannot be written, the first is not replaced either."""
    from minifcn.atomic import atomic_write_all  # noqa: PLC0415
    a, b = tmp_path / "a.npz", tmp_path / "b.jsonl"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")

    def full(f):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=r"cannot write .*b\.jsonl: No space left on device") as err:
        atomic_write_all([(a, lambda f: f.write(b"new a"), ".npz"), (b, full, ".tmp")])
    assert err.value.errno == 28
    assert a.read_bytes() == b"old a" and b.read_bytes() == b"old b"
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "b.jsonl"]
    atomic_write_all([(a, lambda f: f.write(b"new a"), ".npz"), (b, lambda f: f.write(b"new b"), ".tmp")])
    assert a.read_bytes() == b"new a" and b.read_bytes() == b"new b"


def test_temporaries_left_by_a_kill_are_found_and_removed(tmp_path):
    from minifcn.atomic import remove_temporaries, temporaries  # noqa: PLC0415
    target = tmp_path / "ckpt.npz"
    left = [tmp_path / ".ckpt.npz.a1b2.npz", tmp_path / ".ckpt.npz.zz.npz"]
    others = [tmp_path / ".other.npz.a1.npz", tmp_path / "ckpt.npz.bak", tmp_path / ".ckpt.npz.a1.tmp"]
    for path in left + others:
        path.write_bytes(b"x")
    assert temporaries(target, ".npz") == sorted(str(p) for p in left)
    assert remove_temporaries(target, ".npz") == sorted(str(p) for p in left)
    assert all(p.exists() for p in others) and not any(p.exists() for p in left)
