"""Label-map rasteriser: pieces are drawn as integer labels, then shaded in one vectorised pass.

Drawing every piece with PIL as a label (painter's order) and computing colour, pattern and shading
afterwards with numpy gathers keeps rendering free of per-pixel Python loops and gives exact masks
of every owner (garment, body, props) for free, which is where crop boxes and occlusion come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from fashionshoot.data.synthetic.garments import GarmentSpec
from fashionshoot.data.synthetic.patterns import PATTERN_FNS
from fashionshoot.data.synthetic.pieces import Piece
from fashionshoot.errors import DataError

_PATTERN_NAMES = tuple(PATTERN_FNS)
_PATTERN_IDS = {name: k for k, name in enumerate(_PATTERN_NAMES)}
_MAX_LABELS = 255


@dataclass(frozen=True)
class Material:
    """What a piece is made of: base colour, optional pattern, and how round it looks when lit.

    ``period`` is the pattern repeat in the units of the piece's placement (figure units for worn
    garments, pixels for clutter drawn directly in the image).
    """

    base: tuple[int, int, int]
    accent: tuple[int, int, int] | None = None
    pattern: str = "solid"
    period: float = 1.0
    shine: float = 0.35

    @classmethod
    def of_garment(cls, spec: GarmentSpec) -> Material:
        return cls(spec.rgb, spec.accent_rgb, spec.pattern, spec.period)


@lru_cache(maxsize=8)
def _pixel_centres(height: int, width: int, supersample: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of supersampled pixel centres in output-pixel units."""
    ys = (np.arange(height * supersample, dtype=np.float32) + 0.5) / supersample
    xs = (np.arange(width * supersample, dtype=np.float32) + 0.5) / supersample
    return np.meshgrid(xs, ys)


class LabelCanvas:
    """A supersampled label map of ``height`` x ``width`` output pixels. Label 0 is the backdrop."""

    def __init__(self, height: int, width: int, supersample: int) -> None:
        self.height, self.width, self.supersample = height, width, supersample
        self.labels = Image.new("L", (width * supersample, height * supersample), 0)
        self._draw = ImageDraw.Draw(self.labels)
        self._rows: list[tuple[Piece, Material, float]] = []
        self._owners: dict[str, list[int]] = {}

    def outline(self, points: np.ndarray) -> list[tuple[float, float]]:
        """Output-pixel polygon -> PIL coordinates on the supersampled grid (PIL puts pixel centres
        on integers; our pixel i spans [i, i + 1))."""
        scaled = np.asarray(points) * self.supersample - 0.5
        return [(float(x), float(y)) for x, y in scaled]

    def add(self, piece: Piece, material: Material, scale: float, owner: str) -> int:
        """Draw ``piece`` (in output pixels) in front of everything so far; ``scale`` converts the
        material's pattern period to pixels. Returns the new label."""
        label = len(self._rows) + 1
        if label > _MAX_LABELS:
            raise DataError(f"synthetic scene has more than {_MAX_LABELS} pieces")
        self._draw.polygon(self.outline(piece.points), fill=label)
        self._rows.append((piece, material, scale))
        self._owners.setdefault(owner, []).append(label)
        return label

    def mask(self, *owners: str) -> np.ndarray:
        """Boolean supersampled mask of the pixels currently showing any of ``owners``."""
        lookup = np.zeros(_MAX_LABELS + 1, bool)
        for owner in owners:
            lookup[self._owners.get(owner, [])] = True
        return lookup[np.asarray(self.labels)]

    def shade(self, backdrop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(flat colour (h, w, 3), cylinder shading (h, w)) at supersampled size, float32 0-255.

        ``backdrop`` (h, w, 3) fills label 0. Flat colour is what a CG render shows; shading is
        applied only by the "real" style.
        """
        # One row of per-label constants; a single gather by the label map spreads them to pixels.
        table = np.zeros((len(self._rows) + 1, 13), np.float32)
        table[0, 3] = 1.0
        patterns = np.zeros(len(self._rows) + 1, np.uint8)
        for k, (piece, material, scale) in enumerate(self._rows, start=1):
            accent = material.accent if material.accent is not None else material.base
            table[k] = (
                *piece.origin, *piece.axis, 1.0 / max(material.period * scale, 1e-3),
                1.0 / piece.half_width if piece.half_width > 0 else 0.0, material.shine,
                *material.base, *accent,
            )
            patterns[k] = _PATTERN_IDS[material.pattern]

        lab = np.asarray(self.labels)
        (ox, oy, ax, ay, inv_period, inv_half, shine), colours = np.take(table.T[:7], lab, axis=1), table[lab, 7:]
        xs, ys = _pixel_centres(self.height, self.width, self.supersample)
        dx, dy = xs - ox, ys - oy
        along = (dx * ax + dy * ay) * inv_period
        side = dx * ay - dy * ax
        weight = np.zeros(lab.shape, np.float32)
        pat = patterns[lab]
        for pid in set(patterns[1:].tolist()) - {_PATTERN_IDS["solid"]}:
            sel = pat == pid
            weight[sel] = PATTERN_FNS[_PATTERN_NAMES[pid]](along[sel], side[sel] * inv_period[sel])
        base, accent = colours[..., :3], colours[..., 3:]
        flat = base + weight[..., None] * (accent - base)
        flat = np.where((lab == 0)[..., None], backdrop, flat)
        shading = 1.0 - shine * np.minimum((side * inv_half) ** 2, 1.0)
        return flat, shading
