"""Atomic file writes: nothing half-written is ever left under the target name."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path, write, suffix: str = ".tmp") -> str:
    """Call ``write(binary_file)`` on a temporary file beside ``path``, flush it to
    disk, then rename it over ``path``. Missing parent folders are created.

    If ``write`` fails (or the process is interrupted) the temporary file is
    removed and a previous file at ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
