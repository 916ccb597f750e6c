"""A simple articulated figure: joint angles -> COCO-18 keypoints -> body pieces.

The figure is frontal and built from a handful of angles (torso lean, head tilt, two angles per
limb), so a sampled pose always has plausible proportions and the keypoints are exact ground truth
rather than estimates. Coordinates are figure units with y pointing down; a figure is ~1 unit tall.
Keypoint order is COCO-18 (0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left
leg, 14/15 eyes, 16/17 ears); "right" is the figure's right, which is image left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fashionshoot.data.synthetic.pieces import Piece, across, ellipse, framed_polygon, segment, unit

KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "neck", "right_shoulder", "right_elbow", "right_wrist", "left_shoulder", "left_elbow",
    "left_wrist", "right_hip", "right_knee", "right_ankle", "left_hip", "left_knee", "left_ankle",
    "right_eye", "left_eye", "right_ear", "left_ear",
)

# Drawing layers, back to front. Garments sit between the body parts they cover.
HAIR_BACK, LEGS, SHOES, BOTTOMS, TORSO, TOPS, OUTER, ARMS, SLEEVES, OUTER_SLEEVES, HANDS, HEAD, HAIR = range(13)

#: Neck-to-mid-hip length, the unit garments measure their lengths against.
TORSO_LENGTH = 0.36
UPPER_ARM, FOREARM = 0.165, 0.15
THIGH, SHIN = 0.235, 0.215
SHOULDER_HALF, HIP_HALF = 0.105, 0.06
_MID_HIP = np.array([0.0, 0.53])

#: Body half-width along the torso (distance below the neck -> half-width), shared with garments.
_TORSO_Y = np.array([0.0, 0.02, 0.10, 0.22, 0.36, 0.41])
_TORSO_W = np.array([0.045, 0.118, 0.105, 0.085, 0.10, 0.095])


def torso_half_width(y: np.ndarray | float) -> np.ndarray:
    """Half-width of the bare torso at distance ``y`` below the neck (figure units)."""
    return np.interp(y, _TORSO_Y, _TORSO_W)


@dataclass(frozen=True)
class Pose:
    """Joint angles in degrees. Limb angles are (right, left), measured from straight down, positive
    away from the body; arm angles are relative to the torso, leg angles to the vertical."""

    lean: float
    head_tilt: float
    upper_arm: tuple[float, float]
    forearm: tuple[float, float]
    thigh: tuple[float, float]
    shin: tuple[float, float]


def sample_pose(rng: np.random.Generator) -> Pose:
    """A random standing pose: arms anywhere from hanging to raised or on the hip, legs apart."""
    upper = rng.uniform(6.0, 60.0, size=2)
    forearm = np.clip(upper + rng.uniform(-80.0, 80.0, size=2), -45.0, 150.0)
    thigh = rng.uniform(0.0, 14.0, size=2)
    shin = thigh + rng.uniform(-8.0, 8.0, size=2)
    return Pose(
        lean=float(rng.uniform(-6.0, 6.0)),
        head_tilt=float(rng.uniform(-12.0, 12.0)),
        upper_arm=(float(upper[0]), float(upper[1])),
        forearm=(float(forearm[0]), float(forearm[1])),
        thigh=(float(thigh[0]), float(thigh[1])),
        shin=(float(shin[0]), float(shin[1])),
    )


#: The pose of a garment laid flat for a product shot: sleeves and legs slightly spread, straight.
FLAT_LAY = Pose(lean=0.0, head_tilt=0.0, upper_arm=(30.0, 30.0), forearm=(30.0, 30.0),
                thigh=(5.0, 5.0), shin=(5.0, 5.0))


def _direction(angle_deg: float, side: float, down: np.ndarray) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    return np.cos(t) * down + np.sin(t) * side * across(down)


def skeleton(pose: Pose) -> np.ndarray:
    """COCO-18 keypoints (18, 2) of ``pose`` in figure units."""
    lean = np.deg2rad(pose.lean)
    down = np.array([np.sin(lean), np.cos(lean)])
    side_axis = across(down)
    neck = _MID_HIP - TORSO_LENGTH * down
    head_down = _direction(pose.head_tilt, 1.0, down)
    head_side = across(head_down)
    head_centre = neck - 0.095 * head_down
    nose = neck - 0.085 * head_down

    kp = np.zeros((18, 2))
    kp[0], kp[1] = nose, neck
    kp[14] = nose - 0.018 * head_down - 0.022 * head_side
    kp[15] = nose - 0.018 * head_down + 0.022 * head_side
    kp[16] = head_centre - 0.052 * head_side
    kp[17] = head_centre + 0.052 * head_side
    for side, (sh, el, wr), k in ((-1.0, (2, 3, 4), 0), (1.0, (5, 6, 7), 1)):
        kp[sh] = neck + 0.02 * down + side * SHOULDER_HALF * side_axis
        kp[el] = kp[sh] + UPPER_ARM * _direction(pose.upper_arm[k], side, down)
        kp[wr] = kp[el] + FOREARM * _direction(pose.forearm[k], side, down)
    vertical = np.array([0.0, 1.0])
    for side, (hip, knee, ankle), k in ((-1.0, (8, 9, 10), 0), (1.0, (11, 12, 13), 1)):
        kp[hip] = _MID_HIP + side * HIP_HALF * side_axis
        kp[knee] = kp[hip] + THIGH * _direction(pose.thigh[k], side, vertical)
        kp[ankle] = kp[knee] + SHIN * _direction(pose.shin[k], side, vertical)
    return kp


def torso_frame(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neck, down axis) of the torso: the fabric frame of every piece worn on the torso."""
    mid_hip = 0.5 * (kp[8] + kp[11])
    return kp[1].copy(), unit(mid_hip - kp[1])


def _profile_polygon(ys: np.ndarray, half_widths: np.ndarray) -> np.ndarray:
    """A left-right symmetric polygon (local across/down) through the given half-widths."""
    left = np.stack([-half_widths, ys], axis=1)
    right = np.stack([half_widths, ys], axis=1)[::-1]
    return np.concatenate([left, right])


def body_pieces(kp: np.ndarray, long_hair: bool) -> dict[str, list[Piece]]:
    """Body pieces by material ("skin", "hair", "shoes"), posed at keypoints ``kp``."""
    neck, down = torso_frame(kp)
    head_down = unit(kp[1] - 0.5 * (kp[16] + kp[17]))
    head_centre = 0.5 * (kp[16] + kp[17])
    skin = [
        framed_polygon(_profile_polygon(_TORSO_Y, _TORSO_W), neck, down, 0.1, TORSO),
        segment(neck, head_centre, 0.028, 0.028, TORSO),
        ellipse(head_centre, 0.055, 0.07, head_down, HEAD),
    ]
    for sh, el, wr in ((2, 3, 4), (5, 6, 7)):
        skin += [
            ellipse(kp[sh], 0.03, 0.03, down, ARMS),
            segment(kp[sh], kp[el], 0.03, 0.024, ARMS),
            ellipse(kp[el], 0.024, 0.024, down, ARMS),
            segment(kp[el], kp[wr], 0.024, 0.018, ARMS),
            ellipse(kp[wr] + 0.022 * unit(kp[wr] - kp[el]), 0.02, 0.028, kp[wr] - kp[el], HANDS),
        ]
    shoes = []
    for hip, knee, ankle in ((8, 9, 10), (11, 12, 13)):
        skin += [
            segment(kp[hip], kp[knee], 0.05, 0.036, LEGS),
            ellipse(kp[knee], 0.036, 0.036, down, LEGS),
            segment(kp[knee], kp[ankle], 0.036, 0.022, LEGS),
        ]
        shoes.append(ellipse(kp[ankle] + np.array([0.0, 0.012]), 0.03, 0.022, np.array([0.0, 1.0]), SHOES))
    hair = [ellipse(head_centre - 0.045 * head_down, 0.062, 0.042, head_down, HAIR)]
    if long_hair:
        back = np.array([[-0.062, -0.06], [0.062, -0.06], [0.08, 0.13], [-0.08, 0.13]])
        hair.append(framed_polygon(back, head_centre, head_down, 0.0, HAIR_BACK))
    return {"skin": skin, "hair": hair, "shoes": shoes}
