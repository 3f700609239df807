"""User-facing errors: one clear message, non-zero exit, no traceback."""


class KDError(Exception):
    """A problem with the user's input (config, files, models). The CLI prints the message and exits 2."""


class ConfigError(KDError):
    """A bad or unknown configuration key or value."""
