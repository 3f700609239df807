"""One line of ``--help`` per option: the class's ``HELP`` entry, else the comment on the field's own line in its
dataclass (``learning_rate: float = 5e-5  # peak learning rate``), so the help lives next to the default it explains."""
from __future__ import annotations

import dataclasses
import inspect
import re
import typing

_FIELD_LINE = re.compile(r"^\s+(\w+)\s*:[^#=]*(=[^#]*)?#\s*(.+?)\s*$")


def _field_comments(cls: type) -> dict[str, str]:
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its base's
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (frozen app, interactive class): HELP entries only
            continue
        for line in source.splitlines():
            m = _FIELD_LINE.match(line)
            if m:
                out[m.group(1)] = m.group(3)
    return out


def option_help(cls: type) -> dict[str, str]:
    """Dotted option name -> its one-line help, for every field of the dataclass ``cls`` that has one."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update({f"{f.name}.{k}": v for k, v in option_help(hints[f.name]).items()})
        elif f.name in comments:
            out[f.name] = comments[f.name]
    out.update(getattr(cls, "HELP", None) or {})
    return out
