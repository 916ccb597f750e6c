"""Fabric patterns as vectorised functions of fabric coordinates.

``u`` runs down the garment piece and ``v`` across it, both measured in pattern periods. Because the
coordinates live on the garment piece (not on the image), a pattern bends with a sleeve, shrinks
with the figure and rotates with it: the same fabric is recognisable in the product shot and on the
body, but never pixel-for-pixel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PatternFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (_frac(u) < 0.45).astype(np.float32)


def _vertical_stripes(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (_frac(v + 0.25) < 0.45).astype(np.float32)


def _gingham(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Two crossing band sets: where both cross the accent is full, where one crosses it is half-tone.
    return 0.5 * ((_frac(u) < 0.5).astype(np.float32) + (_frac(v) < 0.5).astype(np.float32))


def _windowpane(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return ((_frac(u) < 0.16) | (_frac(v) < 0.16)).astype(np.float32)


def _dots(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    # Staggered lattice: every other row of dots is shifted by half a period.
    row = np.floor(u)
    du = _frac(u) - 0.5
    dv = _frac(v + 0.5 * (row % 2)) - 0.5
    return (du * du + dv * dv < 0.28 * 0.28).astype(np.float32)


def _chevron(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (_frac(u + np.abs(_frac(v) - 0.5)) < 0.45).astype(np.float32)


def _diagonal(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (_frac((u + v) * 0.7071) < 0.45).astype(np.float32)


def _solid(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.zeros(u.shape, dtype=np.float32)


#: Pattern name -> accent weight in [0, 1] at fabric coordinates (u, v) in periods.
PATTERN_FNS: dict[str, PatternFn] = {
    "solid": _solid,
    "stripes": _stripes,
    "vertical_stripes": _vertical_stripes,
    "gingham": _gingham,
    "windowpane": _windowpane,
    "dots": _dots,
    "chevron": _chevron,
    "diagonal": _diagonal,
}
