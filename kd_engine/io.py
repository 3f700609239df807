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


def fsync_dir(path: str) -> None:
    """Make a folder's entries (a rename into it, new files) durable; a no-op where folders cannot be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_dir(target: str, replace: bool = True, prefix: str | None = None) -> Iterator[str]:
    """Yield a temporary folder next to ``target``; on a clean exit it is renamed to ``target`` (an existing
    ``target`` is replaced, or with ``replace=False`` kept and the new folder dropped: another process finished
    first); on an exception it is removed."""
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or f".tmp-{os.path.basename(target)}-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; what we publish (models, caches) is meant to be shared
    try:
        yield tmp
        if os.path.isdir(target):
            if not replace:
                shutil.rmtree(tmp)
                return
            shutil.rmtree(target)
        fsync_dir(tmp)
        os.replace(tmp, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_disk_full(exc: BaseException, path: str) -> bool:
    """Whether ``exc``, raised while writing under ``path``, is the file system running out of space: ENOSPC /
    EDQUOT, or an error of a writer that hides the errno (torch's zip writer: 'unexpected pos ...') while the file
    system under ``path`` has (almost) nothing left."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    try:
        return shutil.disk_usage(probe or ".").free < 4 * 2 ** 20
    except OSError:
        return False


def free_mib(path: str) -> float:
    try:
        return shutil.disk_usage(path).free / 2 ** 20
    except OSError:
        return float("nan")


def load_mapping(path: str, what: str) -> dict:
    """A JSON (``.json``) or YAML file holding a mapping; one error naming ``what`` and the file when it is missing,
    does not parse, or holds something else (see input_files.read_mapping)."""
    from .errors import ConfigError
    from .input_files import InputFileError, read_mapping

    try:
        return read_mapping(path, what)
    except InputFileError as exc:  # a config file's problem is a configuration error
        raise ConfigError(str(exc)) from None
