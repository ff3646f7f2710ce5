"""Checkpoints: ``.npz`` files written atomically and read without unpickling.

A checkpoint holds arrays under prefixed names (``model.conv1_1.weight``,
``optim.momentum.conv1_1.weight``) and one JSON document (``meta``: epoch,
configuration, RNG states, history) stored as UTF-8 bytes in a uint8 array.
Saving writes a temporary file in the same folder, flushes it to disk, then
renames it over the target, so an interrupted save never leaves a half-written
checkpoint and the previous one survives. Loading uses ``allow_pickle=False``.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from .atomic import atomic_write
from .backend import to_numpy

_META_KEY = "__meta__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model."""


SUFFIX = ".npz"  # of the temporaries a save writes beside the target (see minifcn.atomic)


def checkpoint_writer(arrays: dict, meta: dict | None = None):
    """A ``write(binary_file)`` function that writes ``arrays`` and ``meta`` as one ``.npz``
    (for :func:`minifcn.atomic.atomic_write_all`, to write a checkpoint together with other files)."""
    payload = {name: to_numpy(a) for name, a in arrays.items()}
    if _META_KEY in payload:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    payload[_META_KEY] = np.frombuffer(json.dumps(meta or {}).encode("utf-8"), dtype=np.uint8)
    return lambda f: np.savez(f, **payload)


def save_checkpoint(path, arrays: dict, meta: dict | None = None) -> str:
    """Atomically write ``arrays`` (name -> NumPy or CuPy array) and ``meta`` (JSON-able) to ``path``."""
    return atomic_write(path, checkpoint_writer(arrays, meta), suffix=SUFFIX)


def first_nonfinite(arrays: dict):
    """``(name, count)`` of the first floating array holding NaN or infinity, or None."""
    for name, a in arrays.items():
        if a.dtype.kind == "f":
            bad = int(a.size - np.count_nonzero(np.isfinite(a)))
            if bad:
                return name, bad
    return None


def load_checkpoint(path):
    """Read a checkpoint; returns ``(arrays, meta)``. Raises CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not zipfile.is_zipfile(path):  # else np.load would try .npy, then call it "pickled data"
        raise CheckpointError(f"checkpoint {path!r} is not an .npz archive (not a zip file): corrupt, "
                              f"truncated, or some other kind of file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"checkpoint {path!r} is corrupt or not an .npz file: {exc}") from None
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise CheckpointError(f"checkpoint {path!r} has no {_META_KEY!r} entry: not written by minifcn")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: unreadable metadata ({exc})") from None
    return arrays, meta


def read_meta(path) -> dict:
    """Only the metadata of a checkpoint (its arrays are not read)."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path!r} is not an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return json.loads(archive[_META_KEY].tobytes().decode("utf-8"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path!r}: unreadable metadata ({exc})") from None


def split_prefix(arrays: dict, prefix: str) -> dict:
    """The entries named ``prefix.<name>``, keyed by ``<name>``."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
