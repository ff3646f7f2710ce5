"""Atomic file writes: nothing half-written is ever left under the target name.

A write goes to a temporary file beside the target (``.<name>.<random><suffix>``),
is flushed to disk, then renamed over the target. :func:`atomic_write_all`
writes several files that must agree (a checkpoint and the metrics it
holds) by writing every temporary first and renaming only when all of them
are complete, so a full disk or a failed write changes none of them. A
process killed mid-write leaves its temporary behind: :func:`remove_temporaries`
deletes those the next time the folder is used.
"""
from __future__ import annotations

import glob
import os
import tempfile


def atomic_write(path, write, suffix: str = ".tmp") -> str:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, flush it to
    disk, then rename it over ``path``. Missing parent folders are created.

    If ``write`` fails (or the process is interrupted) the temporary file is
    removed and a previous file at ``path`` is left as it was. An OSError
    (a full disk, say) is re-raised naming ``path``.
    """
    return atomic_write_all([(path, write, suffix)])[0]


def atomic_write_all(items) -> list:
    """Write several files so that either all of them are replaced or none is.

    ``items``: ``(path, write, suffix)`` triples, as for :func:`atomic_write`.
    Every temporary is written and flushed before the first rename; the
    renames then run in the order given (a kill between two renames, a window
    of microseconds, leaves the earlier files new and the later ones old).
    """
    done = []  # (tmp, path) written completely
    try:
        for path, write, suffix in items:
            done.append((_write_temporary(os.fspath(path), write, suffix), os.fspath(path)))
        for tmp, path in done:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in done:
            if os.path.exists(tmp):
                os.unlink(tmp)
        raise
    return [path for _, path in done]


def _write_temporary(path: str, write, suffix: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno is not None:
            raise type(exc)(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return tmp


def temporaries(path, suffix: str = ".tmp") -> list:
    """The temporaries :func:`atomic_write` may have left beside ``path`` (a process killed mid-write)."""
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    return sorted(glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*{glob.escape(suffix)}")))


def remove_temporaries(path, suffix: str = ".tmp") -> list:
    """Delete the temporaries left beside ``path``; returns the paths removed.

    Only call this when no other process writes ``path`` at the same time.
    """
    removed = temporaries(path, suffix)
    for tmp in removed:
        os.unlink(tmp)
    return removed
