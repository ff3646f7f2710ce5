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
