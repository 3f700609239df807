"""Where kd_engine keeps what it builds once and reuses (converted models, tokenized data, corpus caches, labels)."""
from __future__ import annotations

import os


def cache_root() -> str:
    """``$KD_ENGINE_CACHE``, else ``~/.cache/kd_engine``."""
    return os.environ.get("KD_ENGINE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kd_engine")


def cache_dir(*parts: str) -> str:
    """A folder under the cache root, e.g. ``cache_dir("corpus")``."""
    return os.path.join(cache_root(), *parts)
