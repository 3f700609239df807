"""Stop-signal names -> signals: a leaf module, so that the configuration can check ``--stop_signals`` without
importing the engine (``engine.signals`` installs the handlers)."""
from __future__ import annotations

import signal

from .errors import ConfigError


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """``['USR1', 'SIGTERM', 'none']`` -> signals; unknown names are a ConfigError (exit 2 before any work)."""
    out = []
    for raw in names:
        name = raw.strip().upper()
        if name in ("", "NONE"):
            continue
        full = name if name.startswith("SIG") else "SIG" + name
        sig = getattr(signal.Signals, full, None) if full.isidentifier() else None
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError(f"stop_signals: '{raw}' is not a signal that can be caught "
                              "(use names like USR1, USR2, TERM, INT, HUP; 'none' disables)")
        out.append(sig)
    return out
