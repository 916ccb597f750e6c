"""Garment geometry: a :class:`GarmentSpec` worn on a posed figure, as pieces in figure units.

The same function draws the product shot (figure in the flat-lay pose, body not drawn) and the
lookbook (figure in a sampled pose), so shape and fabric are shared by construction: sleeves follow
the arms, trouser legs follow the legs, skirts widen to clear spread knees. Each torso piece uses the
torso fabric frame and each limb piece its limb's frame, which is what warps the pattern on the body.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from fashionshoot.data.synthetic.figures import (
    BOTTOMS,
    FOREARM,
    OUTER,
    OUTER_SLEEVES,
    SHIN,
    SLEEVES,
    THIGH,
    TOPS,
    TORSO_LENGTH,
    UPPER_ARM,
    torso_frame,
    torso_half_width,
)
from fashionshoot.data.synthetic.garments import GarmentSpec
from fashionshoot.data.synthetic.pieces import Piece, ellipse, framed_polygon, segment, unit

#: Fraction of the arm a sleeve covers.
_SLEEVE = {"none": 0.0, "short": 0.28, "elbow": 0.55, "long": 0.97}
#: Hem of tops / outerwear, in torso lengths below the neck.
_TOP_HEM = {"cropped": 0.72, "regular": 1.05, "longline": 1.22}
_OUTER_HEM = {"cropped": 0.98, "regular": 1.25, "long": 1.8}
#: Skirt and dress hems: distance below the hip line (figure units).
_SKIRT_DROP = {"mini": 0.12, "knee": 0.25, "midi": 0.34, "maxi": 0.45}
#: Trouser leg length as a fraction of the leg.
_LEG = {"shorts": 0.3, "cropped": 0.78, "full": 0.98}
#: Fit -> width multiplier over the body (tops, outerwear, dress bodice, trouser legs).
_EASE = {"slim": 1.04, "regular": 1.12, "oversized": 1.28, "fitted": 1.04, "a-line": 1.06, "flared": 1.06,
         "skinny": 1.0, "straight": 1.25, "wide": 1.6, "pencil": 1.0}
#: Fit -> half-width added per unit of drop below the hips (skirts, dresses).
_FLARE = {"fitted": 0.12, "pencil": 0.08, "a-line": 0.45, "flared": 0.85}
_WAIST_Y = 0.23
_HIP_Y = TORSO_LENGTH
_CLEAR = 0.008  # fabric stands this far off the body


def garment_pieces(spec: GarmentSpec, kp: np.ndarray) -> list[Piece]:
    """The pieces of ``spec`` worn by a figure with COCO-18 keypoints ``kp`` (figure units)."""
    if spec.category == "top":
        return _top(spec, kp, _TOP_HEM[spec.length], TOPS, SLEEVES, flare=0.1)
    if spec.category == "outerwear":
        return _top(spec, kp, _OUTER_HEM[spec.length], OUTER, OUTER_SLEEVES, flare=0.25, ease_bonus=0.08)
    if spec.category == "dress":
        return _dress(spec, kp)
    if spec.category == "trousers":
        return _trousers(spec, kp)
    return _skirt(spec, kp)


def _body_width(y: np.ndarray, ease: float, flare: float) -> np.ndarray:
    y = np.asarray(y, dtype=float)
    below = np.maximum(y - _HIP_Y, 0.0)
    return torso_half_width(np.minimum(y, 0.41)) * ease + _CLEAR + below * flare


def _torso_outline(ys: np.ndarray, widths: np.ndarray, neck_half: float, neck_dip: float,
                   shoulder: float) -> np.ndarray:
    """Symmetric torso garment outline: neckline, shoulders, then down both sides to the hem."""
    side = np.stack([widths, ys], axis=1)
    return np.concatenate([
        [(-neck_half, -0.004), (-shoulder, 0.02)], side * (-1.0, 1.0),
        side[::-1], [(shoulder, 0.02), (neck_half, -0.004), (0.0, neck_dip)],
    ])


def _side_ys(hem: float) -> np.ndarray:
    ys = np.array([0.1, _WAIST_Y, _HIP_Y, 0.41, 0.5, 0.6, 0.7])
    return np.append(ys[ys < hem - 0.01], hem)


def _top(spec: GarmentSpec, kp: np.ndarray, hem_torso: float, layer: int, sleeve_layer: int,
         flare: float, ease_bonus: float = 0.0) -> list[Piece]:
    neck, down = torso_frame(kp)
    ease = _EASE[spec.fit] + ease_bonus
    hem = hem_torso * TORSO_LENGTH
    ys = _side_ys(hem)
    widths = _body_width(ys, ease, flare)
    shoulder = 0.09 if spec.sleeve == "none" else float(_body_width(0.02, ease, 0.0))
    half_width = float(widths.max())
    if spec.neckline != "open":
        dip = 0.11 if spec.neckline == "v-neck" else 0.035
        outline = _torso_outline(ys, widths, 0.05, dip, shoulder)
        pieces = [framed_polygon(outline, neck, down, half_width, layer)]
    else:
        # Open front: two panels leave a V from the neck to the closure, showing what is beneath.
        closure = 0.2
        right = np.concatenate([[(0.055, -0.004), (shoulder, 0.02)], np.stack([widths, ys], axis=1),
                                [(0.0, hem), (0.0, closure)]])
        left = right * np.array([-1.0, 1.0])
        pieces = [framed_polygon(p, neck, down, half_width, layer) for p in (left, right)]
    return pieces + _sleeves(kp, _SLEEVE[spec.sleeve], ease, sleeve_layer)


def _sleeves(kp: np.ndarray, fraction: float, ease: float, layer: int) -> list[Piece]:
    if fraction <= 0.0:
        return []
    reach = fraction * (UPPER_ARM + FOREARM)
    widths = np.array([0.03, 0.024, 0.018]) * ease + 0.01
    pieces: list[Piece] = []
    for sh, el, wr in ((2, 3, 4), (5, 6, 7)):
        up_dir, fore_dir = unit(kp[el] - kp[sh]), unit(kp[wr] - kp[el])
        pieces.append(ellipse(kp[sh], widths[0], widths[0], up_dir, layer))
        if reach <= UPPER_ARM:
            end_w = np.interp(reach, [0.0, UPPER_ARM], widths[:2])
            pieces.append(segment(kp[sh], kp[sh] + reach * up_dir, widths[0], end_w, layer))
            continue
        end_w = np.interp(reach - UPPER_ARM, [0.0, FOREARM], widths[1:])
        forearm = segment(kp[el], kp[el] + (reach - UPPER_ARM) * fore_dir, widths[1], end_w, layer)
        pieces += [
            segment(kp[sh], kp[el], widths[0], widths[1], layer),
            replace(ellipse(kp[el], widths[1], widths[1], up_dir, layer), origin=kp[sh]),
            # Continue the fabric coordinate from the shoulder so stripes do not restart at the elbow.
            replace(forearm, origin=kp[el] - UPPER_ARM * fore_dir),
        ]
    return pieces


def _legs_local(kp: np.ndarray, neck: np.ndarray, down: np.ndarray) -> list[np.ndarray]:
    """Each leg's hip, knee, ankle in the torso's local (across, down) frame."""
    side = np.array([down[1], -down[0]])
    return [np.stack([(kp[list(j)] - neck) @ side, (kp[list(j)] - neck) @ down], axis=1) for j in ((8, 9, 10), (11, 12, 13))]


def _skirt_outline(kp: np.ndarray, top_y: float, drop: float, fit: str) -> tuple[np.ndarray, np.ndarray]:
    """(ys, half-widths) from ``top_y`` to the hem; the hem always clears both legs."""
    neck, down = torso_frame(kp)
    hem = _HIP_Y + drop
    hip_w = float(_body_width(_HIP_Y, 1.06, 0.0))
    legs_x = max(abs(np.interp(hem, leg[:, 1], leg[:, 0])) for leg in _legs_local(kp, neck, down))
    hem_w = max(hip_w + _FLARE[fit] * drop, legs_x + 0.045)
    ys = np.array([top_y, _HIP_Y, hem])
    widths = np.array([float(_body_width(top_y, 1.03, 0.0)), hip_w, hem_w])
    return ys, widths


def _dress(spec: GarmentSpec, kp: np.ndarray) -> list[Piece]:
    neck, down = torso_frame(kp)
    ease = _EASE[spec.fit]
    skirt_ys, skirt_w = _skirt_outline(kp, _WAIST_Y, _SKIRT_DROP[spec.length], spec.fit)
    ys = np.concatenate([[0.1], skirt_ys])
    widths = np.concatenate([[float(_body_width(0.1, ease, 0.0))], skirt_w])
    shoulder = 0.09 if spec.sleeve == "none" else float(_body_width(0.02, ease, 0.0))
    dip = 0.11 if spec.neckline == "v-neck" else 0.035
    outline = _torso_outline(ys, widths, 0.05, dip, shoulder)
    body = framed_polygon(outline, neck, down, float(widths.max()), TOPS)
    return [body] + _sleeves(kp, _SLEEVE[spec.sleeve], ease, SLEEVES)


def _skirt(spec: GarmentSpec, kp: np.ndarray) -> list[Piece]:
    neck, down = torso_frame(kp)
    ys, widths = _skirt_outline(kp, _WAIST_Y, _SKIRT_DROP[spec.length], spec.fit)
    outline = np.concatenate([np.stack([-widths, ys], 1), np.stack([widths, ys], 1)[::-1]])
    return [framed_polygon(outline, neck, down, float(widths.max()), BOTTOMS)]


def _trousers(spec: GarmentSpec, kp: np.ndarray) -> list[Piece]:
    neck, down = torso_frame(kp)
    ease = _EASE[spec.fit]
    top_w = float(_body_width(_WAIST_Y + 0.02, 1.03, 0.0))
    hip_w = float(_body_width(_HIP_Y, 1.05, 0.0))
    seat = np.array([(-top_w, _WAIST_Y + 0.02), (top_w, _WAIST_Y + 0.02), (hip_w, _HIP_Y),
                     (0.07, 0.44), (0.0, 0.43), (-0.07, 0.44), (-hip_w, _HIP_Y)])
    pieces = [framed_polygon(seat, neck, down, hip_w, BOTTOMS)]
    reach = _LEG[spec.length] * (THIGH + SHIN)
    widths = np.array([0.05 * ease, 0.036 * ease, 0.022 * ease]) + _CLEAR
    if spec.fit == "wide":
        widths[2] += 0.025
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        thigh_dir, shin_dir = unit(kp[knee] - kp[hip]), unit(kp[ankle] - kp[knee])
        start = kp[hip] - 0.03 * thigh_dir
        if reach <= THIGH:
            end_w = np.interp(reach, [0.0, THIGH], widths[:2])
            pieces.append(segment(start, kp[hip] + reach * thigh_dir, widths[0], end_w, BOTTOMS))
            continue
        end_w = np.interp(reach - THIGH, [0.0, SHIN], widths[1:])
        shin = segment(kp[knee], kp[knee] + (reach - THIGH) * shin_dir, widths[1], end_w, BOTTOMS)
        pieces += [
            segment(start, kp[knee], widths[0], widths[1], BOTTOMS),
            replace(ellipse(kp[knee], widths[1], widths[1], thigh_dir, BOTTOMS), origin=start),
            replace(shin, origin=kp[knee] - (THIGH + 0.03) * shin_dir),
        ]
    return pieces
