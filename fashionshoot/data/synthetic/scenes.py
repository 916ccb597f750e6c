"""Scenes: a garment's product shot, and a lookbook photo of it worn in a cluttered room.

The product shot is the garment alone, flat-lay pose, centred on a near-white backdrop. The
lookbook puts the same garment on a posed figure (with other garments of an outfit), places the
figure with random scale, rotation and framing, draws clutter behind it from the same colour and
pattern vocabulary as the catalogue, and may put a prop in front of the garment. Everything random
comes from the one ``rng`` passed in, in a fixed order, so a scene is reproducible from its seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fashionshoot.data.synthetic.canvas import LabelCanvas, Material
from fashionshoot.data.synthetic.config import SyntheticConfig
from fashionshoot.data.synthetic.dressing import garment_pieces
from fashionshoot.data.synthetic.figures import FLAT_LAY, body_pieces, sample_pose, skeleton
from fashionshoot.data.synthetic.garments import GarmentSpec, sample_random_garment
from fashionshoot.data.synthetic.patterns import PATTERN_FNS
from fashionshoot.data.synthetic.pieces import Piece, Placement, bounds, ellipse, framed_polygon
from fashionshoot.data.synthetic.styles import downsample, to_image
from fashionshoot.data.synthetic.vocab import COLOURS, HAIR_COLOURS, SKIN_TONES

_PRODUCT_MARGIN = 0.08
#: Colour of the other garments when ``outfit`` is off: plain, and not a catalogue colour.
_NEUTRAL = (66, 66, 70)
_PLACEMENT_TRIES = 12
#: A placement is accepted when this much of the garment's box is inside the frame.
_MIN_VISIBLE = 0.85
#: A prop is dropped (not drawn) if it would hide more than this fraction of the garment.
_MAX_HIDDEN = 0.4
_OCCLUDED_CONFIDENCE = 0.5


@dataclass(frozen=True)
class LookbookScene:
    """A composed lookbook before image formation (see :mod:`.styles`).

    ``flat`` / ``shading`` are supersampled; ``keypoints`` are COCO-18 rows ``[x, y, conf]`` in
    output pixels (conf 1 visible, 0.5 hidden behind a prop, 0 outside the frame with x = y = 0);
    ``crop_box`` is the (x1, y1, x2, y2) box of the garment's visible pixels before props.
    """

    flat: np.ndarray
    shading: np.ndarray
    keypoints: np.ndarray
    crop_box: tuple[float, float, float, float]
    info: dict[str, Any]


def render_product(spec: GarmentSpec, size: tuple[int, int], supersample: int) -> Image.Image:
    """The catalogue image: the garment alone, centred, softly shaded, with a drop shadow."""
    h, w = size
    pieces = garment_pieces(spec, skeleton(FLAT_LAY))
    x1, y1, x2, y2 = bounds(pieces)
    scale = min(w * (1 - 2 * _PRODUCT_MARGIN) / (x2 - x1), h * (1 - 2 * _PRODUCT_MARGIN) / (y2 - y1))
    placement = Placement(scale, 0.0, ((x1 + x2) / 2, (y1 + y2) / 2), (w / 2, h / 2))
    canvas = LabelCanvas(h, w, supersample)
    material = replace(Material.of_garment(spec), shine=0.15)
    for piece in sorted(pieces, key=lambda p: p.layer):
        canvas.add(placement.piece(piece), material, scale, "garment")
    rows = np.linspace(248.0, 234.0, h * supersample, dtype=np.float32)
    backdrop = np.broadcast_to(rows[:, None, None], (h * supersample, w * supersample, 3))
    flat, shading = canvas.shade(backdrop)
    mask = canvas.mask("garment")
    offset = 2 * supersample
    shadow_img = Image.fromarray((mask * 255).astype(np.uint8)).transform(
        mask.shape[::-1], Image.Transform.AFFINE, (1, 0, -offset, 0, 1, -offset)
    ).filter(ImageFilter.GaussianBlur(2.5 * supersample))
    shadow = np.asarray(shadow_img, dtype=np.float32) / 255.0 * ~mask
    image = flat * (shading * (1.0 - 0.25 * shadow))[..., None]
    return to_image(downsample(image, supersample))


def compose_lookbook(spec: GarmentSpec, config: SyntheticConfig, rng: np.random.Generator) -> LookbookScene:
    """Dress a posed figure in ``spec`` (plus an outfit), place it in a cluttered scene."""
    h, w = config.lookbook_size
    ss = config.supersample
    pose = sample_pose(rng)
    kp = skeleton(pose)
    body = body_pieces(kp, long_hair=bool(rng.random() < 0.5))
    body_materials = {
        "skin": Material(SKIN_TONES[int(rng.integers(len(SKIN_TONES)))], shine=0.3),
        "hair": Material(HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))], shine=0.2),
        "shoes": Material(_random_colour(rng), shine=0.3),
    }
    others = _outfit(spec, rng, config.outfit)
    main = garment_pieces(spec, kp)
    items = [(p, body_materials[part], "body") for part, pieces in body.items() for p in pieces]
    items += [(p, Material.of_garment(spec), "garment") for p in main]
    for other in others:
        items += [(p, Material.of_garment(other), "outfit") for p in garment_pieces(other, kp)]

    placement = _place(rng, [p for p, _, _ in items], main, config)
    canvas = LabelCanvas(h, w, ss)
    backdrop = _backdrop(rng, h, w, ss)
    _clutter(canvas, rng, config)
    for piece, material, owner in sorted(items, key=lambda item: item[0].layer):
        canvas.add(placement.piece(piece), material, placement.scale, owner)
    garment_mask = canvas.mask("garment")
    crop_box = _box(garment_mask, ss) or _clip_box(bounds([placement.piece(p) for p in main]), h, w)
    occluded = rng.random() < config.occlusion_prob and _add_prop(canvas, rng, crop_box, garment_mask)
    flat, shading = canvas.shade(backdrop)
    keypoints = _keypoints(placement.points(kp), canvas.mask("prop"), h, w, ss)
    info = {
        "occluded": bool(occluded),
        "rotation": round(placement.rotation_deg, 3),
        "figure_height": round(placement.scale / h, 4),
        "outfit": [{"category": o.category, "colour": o.colour, "pattern": o.pattern} for o in others],
    }
    return LookbookScene(flat, shading, keypoints, crop_box, info)


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    palette = tuple(COLOURS.values())
    return palette[int(rng.integers(len(palette)))]


def _random_material(rng: np.random.Generator, period_px: tuple[float, float]) -> Material:
    """A clutter/prop material from the catalogue palette and patterns (so colour alone misleads)."""
    base, accent = _random_colour(rng), _random_colour(rng)
    patterns = tuple(PATTERN_FNS)
    pattern = patterns[int(rng.integers(1, len(patterns)))] if rng.random() < 0.35 else "solid"
    return Material(base, accent, pattern, float(rng.uniform(*period_px)), shine=0.15)


def _outfit(spec: GarmentSpec, rng: np.random.Generator, random_outfit: bool) -> list[GarmentSpec]:
    """The other garments worn with ``spec``, chosen so none of them hides it."""

    def other(category: str, **fixed: str) -> GarmentSpec:
        garment = replace(sample_random_garment(rng, category), **fixed)
        if random_outfit:
            return garment
        return replace(garment, colour="neutral", rgb=_NEUTRAL, pattern="solid", accent=None, accent_rgb=None)

    bottom = "trousers" if rng.random() < 0.6 else "skirt"
    if spec.category == "top":
        return [other(bottom)]
    if spec.category == "outerwear":
        return [other("dress")] if rng.random() < 0.3 else [other("top"), other(bottom)]
    if spec.category == "dress":
        return []
    # A bottom: the top is tucked-length and any jacket cropped, so the bottom stays visible.
    worn = [other("top", length="cropped" if rng.random() < 0.5 else "regular")]
    if random_outfit and rng.random() < 0.3:
        worn.append(other("outerwear", length="cropped"))
    return worn


def _place(rng: np.random.Generator, figure: list[Piece], garment: list[Piece], config: SyntheticConfig) -> Placement:
    """Random scale / rotation / framing that keeps most of the garment in the frame."""
    h, w = config.lookbook_size
    fx1, fy1, fx2, fy2 = bounds(figure)
    gx1, gy1, gx2, gy2 = bounds(garment)
    figure_centre = np.array([(fx1 + fx2) / 2, (fy1 + fy2) / 2])
    garment_centre = np.array([(gx1 + gx2) / 2, (gy1 + gy2) / 2])
    garment_points = np.concatenate([p.points for p in garment])
    for _ in range(_PLACEMENT_TRIES):
        scale = rng.uniform(*config.figure_scale) * h / (fy2 - fy1)
        rotation = rng.uniform(-config.max_rotation, config.max_rotation)
        pull = rng.uniform(0.3, 1.0)
        pivot = (1 - pull) * figure_centre + pull * garment_centre
        jitter_x, jitter_y = config.framing_jitter
        centre = (w * (0.5 + rng.normal(0.0, jitter_x)), h * (0.5 + rng.normal(0.0, jitter_y)))
        placement = Placement(float(scale), float(rotation), (float(pivot[0]), float(pivot[1])), centre)
        pts = placement.points(garment_points)
        box = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
        inside = _clip_box(box, h, w)
        area = (box[2] - box[0]) * (box[3] - box[1])
        if (inside[2] - inside[0]) * (inside[3] - inside[1]) >= _MIN_VISIBLE * area:
            return placement
    # Fallback: the smallest figure, upright, garment centred (always fits).
    scale = config.figure_scale[0] * h / (fy2 - fy1)
    pivot = (float(garment_centre[0]), float(garment_centre[1]))
    return Placement(float(scale), 0.0, pivot, (w / 2, h / 2))


def _backdrop(rng: np.random.Generator, h: int, w: int, ss: int) -> np.ndarray:
    """Wall with a vertical gradient over a floor band, in muted catalogue colours."""

    def muted() -> np.ndarray:
        return 0.5 * np.asarray(_random_colour(rng), np.float32) + 0.5 * rng.uniform(90.0, 230.0)

    top, bottom, floor = muted(), muted(), muted()
    horizon = rng.uniform(0.6, 0.9)
    t = (np.arange(h * ss, dtype=np.float32) + 0.5) / (h * ss)
    wall = top + (t[:, None] / horizon) * (bottom - top)
    ground = floor * (0.85 + 0.15 * t[:, None])
    rows = np.where((t < horizon)[:, None], wall, ground)
    return np.broadcast_to(rows[:, None, :], (h * ss, w * ss, 3))


def _clutter(canvas: LabelCanvas, rng: np.random.Generator, config: SyntheticConfig) -> None:
    """Random rectangles, discs, poles and triangles behind the figure."""
    h, w = config.lookbook_size
    for _ in range(int(rng.integers(config.clutter[0], config.clutter[1] + 1))):
        kind = int(rng.integers(4))
        centre = rng.uniform((0.0, 0.0), (w, h))
        sx, sy = rng.uniform(0.06, 0.4) * w, rng.uniform(0.06, 0.4) * h
        angle = np.deg2rad(rng.uniform(0.0, 180.0))
        axis = np.array([np.sin(angle), np.cos(angle)])
        if kind == 0:
            local = np.array([(-sx, -sy), (sx, -sy), (sx, sy), (-sx, sy)])
        elif kind == 1:
            piece = ellipse(centre, sx, sy, axis, 0)
        elif kind == 2:
            pole = rng.uniform(0.02, 0.05) * w
            local = np.array([(-pole, -h), (pole, -h), (pole, h), (-pole, h)])
        else:
            local = np.array([(-sx, sy), (sx, sy), (rng.uniform(-sx, sx), -sy)])
        if kind != 1:
            piece = framed_polygon(local, centre, axis, 0.0, 0)
        canvas.add(piece, _random_material(rng, (3.0, 8.0)), 1.0, "clutter")


def _add_prop(canvas: LabelCanvas, rng: np.random.Generator, crop_box: tuple[float, float, float, float],
              garment_mask: np.ndarray) -> bool:
    """Put a box or disc in front of one side of the garment; skipped if it would hide too much."""
    x1, y1, x2, y2 = crop_box
    half_w = rng.uniform(0.35, 0.7) * (x2 - x1) / 2
    half_h = rng.uniform(0.25, 0.5) * (y2 - y1) / 2
    side = int(rng.integers(3))
    cx = (x1, x2, rng.uniform(x1, x2))[side]
    cy = rng.uniform(y1, y2) if side < 2 else y2
    tilt = np.deg2rad(rng.uniform(-10.0, 10.0))
    axis = np.array([np.sin(tilt), np.cos(tilt)])
    if rng.random() < 0.5:
        piece = ellipse(np.array([cx, cy]), half_w, half_h, axis, 0)
    else:
        local = np.array([(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)])
        piece = framed_polygon(local, np.array([cx, cy]), axis, 0.0, 0)
    material = _random_material(rng, (3.0, 6.0))
    footprint = Image.new("1", canvas.labels.size, 0)
    ImageDraw.Draw(footprint).polygon(canvas.outline(piece.points), fill=1)
    hidden = np.count_nonzero(np.asarray(footprint) & garment_mask)
    if hidden > _MAX_HIDDEN * max(np.count_nonzero(garment_mask), 1):
        return False
    canvas.add(piece, material, 1.0, "prop")
    return True


def _box(mask: np.ndarray, ss: int) -> tuple[float, float, float, float] | None:
    """Bounding box of a supersampled mask in output pixels; None when the mask is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (cols[0] / ss, rows[0] / ss, (cols[-1] + 1) / ss, (rows[-1] + 1) / ss)


def _clip_box(box: tuple[float, float, float, float], h: int, w: int) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), w), min(max(y1, 0.0), h), min(max(x2, 0.0), w), min(max(y2, 0.0), h))


def _keypoints(points: np.ndarray, prop_mask: np.ndarray, h: int, w: int, ss: int) -> np.ndarray:
    """COCO-18 [x, y, conf] rows: 1 visible, 0.5 behind a prop, 0 (and x = y = 0) outside the frame."""
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    out = np.zeros((len(points), 3), np.float32)
    out[inside, :2] = points[inside]
    cols = np.clip((points[:, 0] * ss).astype(int), 0, w * ss - 1)
    rows = np.clip((points[:, 1] * ss).astype(int), 0, h * ss - 1)
    hidden = prop_mask[rows, cols]
    out[inside, 2] = np.where(hidden[inside], _OCCLUDED_CONFIDENCE, 1.0)
    return out
