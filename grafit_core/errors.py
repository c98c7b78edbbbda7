"""Errors users see: each names the file, key or class at fault."""


class GrafitError(ValueError):
    """Base class: bad input that must be refused before any work starts."""


class ConfigError(GrafitError):
    """A configuration file or value is invalid (names the file and the key)."""


class DataError(GrafitError):
    """A dataset is malformed (names the file, folder, class or level)."""
