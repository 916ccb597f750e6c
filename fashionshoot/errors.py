"""Exception types shared across the library, and how command-line scripts report them.

One small hierarchy so callers can catch "anything fashionshoot refused" without catching
unrelated bugs, and so every message names the file, key or model it is about.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class FashionshootError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(FashionshootError, ValueError):
    """A configuration key is unknown, missing, or of the wrong type."""


class DataError(FashionshootError, ValueError):
    """An input file is missing, unreadable or malformed. The message names the file."""


class MissingWeightsError(FashionshootError, FileNotFoundError):
    """A pretrained model could not be found locally (and downloading is not allowed)."""


def script_exit_code(script: str, job: Callable[[], object]) -> int:
    """Run a command-line script's ``job``; return its exit status.

    What the library refuses (a bad key, a missing file or weight) is printed as ``<script>: error:
    <message>`` with status 1: the message names the fix, and a traceback would bury it. Any other
    exception is a bug and keeps its traceback."""
    try:
        job()
    except FashionshootError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return 1
    return 0
