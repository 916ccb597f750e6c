"""Flat polygon pieces in figure units, and the similarity transform that places them in an image.

Bodies, garments, clutter and props are all lists of :class:`Piece`: a polygon plus the fabric frame
(origin and "down" axis) its pattern is laid out in. Keeping geometry in figure units (a standing
figure is about one unit tall) until a single :class:`Placement` maps it to pixels is what lets the
product shot and every lookbook share one garment definition.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

#: Vertices used to approximate ellipses and joint discs.
_ELLIPSE_VERTICES = 20


@dataclass(frozen=True)
class Piece:
    """One polygon with its fabric frame.

    ``axis`` is the unit vector the pattern's ``u`` coordinate runs along (down a limb, down the
    torso); ``half_width`` > 0 turns on cylinder shading across the piece in the "real" style.
    ``layer`` orders drawing (higher is drawn later, i.e. in front).
    """

    points: np.ndarray
    origin: np.ndarray
    axis: np.ndarray
    half_width: float
    layer: int


@dataclass(frozen=True)
class Placement:
    """Similarity transform figure units -> image pixels: rotate about ``pivot``, scale, translate."""

    scale: float
    rotation_deg: float
    pivot: tuple[float, float]
    centre: tuple[float, float]

    @cached_property
    def matrix(self) -> np.ndarray:
        t = np.deg2rad(self.rotation_deg)
        return self.scale * np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])

    def points(self, pts: np.ndarray) -> np.ndarray:
        """Map (n, 2) figure-unit points to pixel coordinates."""
        return (np.asarray(pts) - self.pivot) @ self.matrix.T + self.centre

    def piece(self, piece: Piece) -> Piece:
        """The same piece in pixel units (frame moved along, half-width scaled)."""
        rot = self.matrix / self.scale
        return Piece(
            points=self.points(piece.points),
            origin=self.points(piece.origin[None])[0],
            axis=rot @ piece.axis,
            half_width=piece.half_width * self.scale,
            layer=piece.layer,
        )


def unit(v: np.ndarray) -> np.ndarray:
    n = float(np.hypot(v[0], v[1]))
    return v / n if n > 1e-9 else np.array([0.0, 1.0])


def across(axis: np.ndarray) -> np.ndarray:
    """The perpendicular of a "down" axis that points to image right for an upright figure."""
    return np.array([axis[1], -axis[0]])


def segment(a: np.ndarray, b: np.ndarray, wa: float, wb: float, layer: int) -> Piece:
    """A tapered quad from ``a`` to ``b`` with half-widths ``wa``/``wb``, framed along the segment."""
    axis = unit(b - a)
    n = across(axis)
    pts = np.stack([a + n * wa, b + n * wb, b - n * wb, a - n * wa])
    return Piece(pts, np.asarray(a, dtype=float), axis, max(wa, wb), layer)


def ellipse(
    centre: np.ndarray, rx: float, ry: float, axis: np.ndarray, layer: int, shade: bool = True
) -> Piece:
    """An ellipse with radius ``ry`` along ``axis`` and ``rx`` across it."""
    axis = unit(np.asarray(axis, dtype=float))
    t = np.linspace(0.0, 2 * np.pi, _ELLIPSE_VERTICES, endpoint=False)
    local = np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)
    pts = centre + local[:, :1] * across(axis) + local[:, 1:] * axis
    return Piece(pts, np.asarray(centre, dtype=float), axis, rx if shade else 0.0, layer)


def framed_polygon(
    local: np.ndarray, origin: np.ndarray, axis: np.ndarray, half_width: float, layer: int
) -> Piece:
    """A polygon given in a local (across, down) frame at ``origin``; the frame is its fabric frame."""
    local = np.asarray(local, dtype=float)
    pts = origin + local[:, :1] * across(axis) + local[:, 1:] * axis
    return Piece(pts, np.asarray(origin, dtype=float), axis, half_width, layer)


def bounds(pieces: list[Piece]) -> tuple[float, float, float, float]:
    """Axis-aligned (x1, y1, x2, y2) box around all pieces' vertices."""
    pts = np.concatenate([p.points for p in pieces])
    return float(pts[:, 0].min()), float(pts[:, 1].min()), float(pts[:, 0].max()), float(pts[:, 1].max())
