"""One layer for every file a user hands kd_engine: configs, DeepSpeed JSON, data, class names, model folders,
tokenizers, teacher / label / seqkd / corpus caches, checkpoints, run locks and logs.

Every read of such a file sits inside ``with reading(what, path):`` (tests/test_input_files.py checks this on the
source), so a parse or load error of any kind — bytes that are not UTF-8, JSON or YAML that does not parse, a
truncated safetensors or torch file, a pickle the safe loader refuses, a folder where a file belongs, permissions —
becomes one ``InputFileError`` (a ``KDError``: one ``error:`` line, exit 2) that names the file and says what is
wrong with it. The reads happen during validation, before the first write; code that can recover from a bad file
(an older checkpoint, a relabelled chunk) catches ``InputFileError`` and nothing broader.

A leaf module: it imports nothing of kd_engine but the errors.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from .errors import KDError

logger = logging.getLogger(__name__)


class InputFileError(KDError):
    """A file kd_engine was given (or wrote earlier) is missing, unreadable, or does not parse."""


def _first_line(text: str, limit: int = 200) -> str:
    text = str(text).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def describe(exc: BaseException) -> str:
    """What went wrong, in a few words a user can act on (no traceback, one line)."""
    if isinstance(exc, UnicodeDecodeError):
        byte = exc.object[exc.start] if exc.start < len(exc.object) else 0
        return f"is not UTF-8 text (byte {exc.start + 1}: 0x{byte:02x}); is it the right file?"
    if isinstance(exc, json.JSONDecodeError):
        return f"is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if type(exc).__module__.startswith("yaml"):
        return f"is not valid YAML: {' '.join(str(exc).split())[:200]}"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    if isinstance(exc, NotADirectoryError):
        return "is a file, not a folder"
    if isinstance(exc, FileNotFoundError):
        return f"not found ({exc.filename or 'no such file'})"
    if isinstance(exc, PermissionError):
        return "cannot be read: permission denied"
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return ("holds a pickle that torch's safe loader refuses (weights_only: it holds more than tensors); "
                "use a file of plain tensors (safetensors) from a source you trust")
    if type(exc).__name__ == "SafetensorError" or "safetensors" in type(exc).__module__:
        return f"is damaged or incomplete ({_first_line(exc)}); copy or write it again"
    if (isinstance(exc, EOFError) or type(exc).__name__ == "BadZipFile" or "PytorchStreamReader" in str(exc)
            or "zip archive" in str(exc)):
        return "is truncated or not a torch file; copy or write it again"
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or _first_line(exc)}"
    return f"could not be read ({type(exc).__name__}: {_first_line(exc)})"


@contextmanager
def reading(what: str, path: str, explain: Optional[Callable[[Exception], Optional[str]]] = None) -> Iterator[None]:
    """Turn any error raised while reading ``path`` into one ``InputFileError``: "<what> <path> <what is wrong>".

    ``explain(exc)`` may return a whole message of its own (a model folder names its weight file, a hub id says
    the hub could not provide it); None keeps the default. ``KDError``s raised inside pass through unchanged.
    """
    try:
        yield
    except KDError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # every parse / load error of every library: the point of this layer
        logger.debug("reading %s %s failed", what, path, exc_info=True)
        message = explain(exc) if explain is not None else None
        raise InputFileError(message or f"{what} {path} {describe(exc)}") from None


def check_file(path: str, what: str) -> None:
    """InputFileError unless ``path`` is an existing regular file (a folder, a missing path)."""
    if os.path.isdir(path):
        raise InputFileError(f"{what} {path} is a folder, not a file")
    if not os.path.isfile(path):
        raise InputFileError(f"{what} not found: {path}")


def read_text(path: str, what: str, encoding: str = "utf-8") -> str:
    check_file(path, what)
    with reading(what, path), open(path, encoding=encoding) as fh:
        return fh.read()


def read_json(path: str, what: str, expect: Optional[type] = dict) -> Any:
    """The parsed JSON of ``path``; InputFileError when it does not parse or is not an ``expect`` (None: any)."""
    text = read_text(path, what)
    with reading(what, path):
        data = json.loads(text)
    if expect is not None and not isinstance(data, expect):
        raise InputFileError(f"{what} {path} must hold a JSON {_kind(expect)}, not {_kind(type(data))}")
    return data


def read_mapping(path: str, what: str) -> dict:
    """A JSON (``.json``) or YAML file holding a mapping (an empty YAML file is an empty mapping)."""
    text = read_text(path, what)
    with reading(what, path):
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputFileError(f"{what} {path} must hold a mapping of keys to values")
    return data


def load_tensors(path: str, what: str, expect: Optional[type] = dict, **kwargs) -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")`` (tensors and plain containers only)."""
    import torch

    check_file(path, what)

    def explain(exc: Exception) -> Optional[str]:  # mmap of a truncated file: OSError(EINVAL), not a parse error
        if isinstance(exc, OSError) and not isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return f"{what} {path} is truncated or not a torch file ({exc.strerror or exc}); copy or write it again"
        return None

    with reading(what, path, explain=explain):
        obj = torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    if expect is not None and not isinstance(obj, expect):
        raise InputFileError(f"{what} {path} holds a {type(obj).__name__}, not the {_kind(expect)} kd_engine writes")
    return obj


def _kind(t: type) -> str:
    return {dict: "mapping", list: "list", str: "string"}.get(t, t.__name__)
