"""Atomic writes: a crash mid-save never leaves a half-written model folder or file. What is written gets the
modes a plain ``open``/``mkdir`` would give under the process's umask (the temporary names are private: 0600/0700)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator


def _umask() -> int:
    try:  # Linux: read without changing it (other threads may be creating files)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)  # elsewhere: read by setting it, a private one meanwhile, and put it back at once
    os.umask(mask)
    return mask


def _publish(path: str, mode: int) -> None:
    """Give a finished temporary file or folder the mode ``open``/``mkdir`` would have (``mode`` under the umask),
    keeping its special bits (a group folder's setgid); left as it is where the file system refuses modes."""
    try:
        os.chmod(path, (os.stat(path).st_mode & 0o7000) | (mode & ~_umask()))
    except OSError:
        pass


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` by rename, on error it is removed.

    >>> with atomic_directory("out/model") as tmp:
    ...     model.save_pretrained(tmp)
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield tmp
        _publish(tmp, 0o777)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "previous"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file path beside ``path`` with the same extension; on success it replaces ``path`` by
    rename, on error it is removed.

    >>> with atomic_file("out/model.zip") as tmp:
    ...     model.save(tmp)
    """
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    name = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", suffix=os.path.splitext(name)[1], dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        _publish(tmp, 0o666)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
