"""Atomic writes: a file or folder appears complete under its final name, or not at all (temp + rename)."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Open a temporary file next to ``path``; on a clean exit it is flushed, fsynced and renamed to ``path``; on an
    exception it is removed and ``path`` is left as it was."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.path.basename(path)}-", dir=d)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    with atomic_file(path) as fh:
        fh.write(text)


@contextlib.contextmanager
def atomic_dir(target: str, replace: bool = True, prefix: str | None = None) -> Iterator[str]:
    """Yield a temporary folder next to ``target``; on a clean exit it is renamed to ``target`` (an existing
    ``target`` is replaced, or with ``replace=False`` kept and the new folder dropped: another process finished
    first); on an exception it is removed."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or f".tmp-{os.path.basename(target)}-", dir=parent)
    try:
        yield tmp
        if os.path.isdir(target):
            if not replace:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
