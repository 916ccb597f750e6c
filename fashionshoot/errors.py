"""Exception types shared across the library.

One small hierarchy so callers can catch "anything fashionshoot refused" without catching
unrelated bugs, and so every message names the file, key or model it is about.
"""


class FashionshootError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(FashionshootError, ValueError):
    """A configuration key is unknown, missing, or of the wrong type."""


class DataError(FashionshootError, ValueError):
    """An input file is missing, unreadable or malformed. The message names the file."""


class MissingWeightsError(FashionshootError, FileNotFoundError):
    """A pretrained model could not be found locally (and downloading is not allowed)."""
