"""Method plugins: every module in this package registers its method with ``@register("name")``."""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import ConfigError
from .base import _REGISTRY, DataBundle, Method, register  # noqa: F401

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def method_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}' (available: {', '.join(sorted(_REGISTRY))}){hint}")
    return _REGISTRY[name]
