"""Image loading with errors that name the file.

PIL's own errors ("cannot identify image file <_io.BytesIO ...>") do not say which of a million files
was bad. Every loader in the library goes through :func:`load_image` / :func:`decode_image` so a bad
file always raises :class:`~fashionshoot.errors.DataError` with its path or key.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from fashionshoot.errors import DataError

#: File suffixes the folder-scanning readers treat as images.
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


def decode_image(data: bytes, where: str, mode: str = "RGB") -> Image.Image:
    """Decode encoded image bytes fully (not lazily), converting to ``mode``.

    ``where`` names the source (path, or ``shard.tar#key.jpg``) for the error message.
    """
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        # No copy when the mode already matches: a full-size copy per image costs ~4 % of reader throughput.
        return img if not mode or img.mode == mode else img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: cannot decode image ({exc.__class__.__name__}: {exc})") from exc


def load_image(path: str | Path, mode: str = "RGB") -> Image.Image:
    """Read and decode the image at ``path``; a missing or corrupt file is a :class:`DataError`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return decode_image(data, str(path), mode)
