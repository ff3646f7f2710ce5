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


def save_checkpoint(path, arrays: dict, meta: dict | None = None) -> str:
    """Atomically write ``arrays`` (name -> NumPy or CuPy array) and ``meta`` (JSON-able) to ``path``."""
    payload = {name: to_numpy(a) for name, a in arrays.items()}
    if _META_KEY in payload:
        raise ValueError(f"array name {_META_KEY!r} is reserved")
    payload[_META_KEY] = np.frombuffer(json.dumps(meta or {}).encode("utf-8"), dtype=np.uint8)
    return atomic_write(path, lambda f: np.savez(f, **payload), suffix=".npz")


def load_checkpoint(path):
    """Read a checkpoint; returns ``(arrays, meta)``. Raises CheckpointError naming the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
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


def split_prefix(arrays: dict, prefix: str) -> dict:
    """The entries named ``prefix.<name>``, keyed by ``<name>``."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}
