"""Body keypoint formats, conversions between them, Gaussian heatmaps and rendered skeletons.

Every public set stores pose differently (Dress Code: OpenPose COCO-18 in a 384x512 frame; VITON-HD:
OpenPose BODY_25 JSON; MPII-style tools: 16 points), while the models take one layout. The library's
internal layout is a float32 ``(K, 3)`` array of ``[x, y, confidence]`` rows in image pixels, with
confidence ``0`` meaning "missing". Readers convert to COCO-18 with :func:`convert_keypoints` and move
points between frames with :func:`rescale_keypoints`; models consume :func:`keypoint_heatmaps`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from fashionshoot.errors import DataError


@dataclass(frozen=True)
class PoseFormat:
    """A keypoint layout: joint names in storage order and the limbs (index pairs) of its skeleton."""

    name: str
    joints: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]

    @property
    def num_joints(self) -> int:
        return len(self.joints)


COCO18 = PoseFormat(
    "coco18",
    (
        "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist",
        "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
    ),
    # OpenPose's limb list for the COCO model (the one its renderer draws).
    (
        (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
        (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
    ),
)

BODY25 = PoseFormat(
    "body25",
    (
        "nose", "neck", "r_shoulder", "r_elbow", "r_wrist", "l_shoulder", "l_elbow", "l_wrist", "mid_hip",
        "r_hip", "r_knee", "r_ankle", "l_hip", "l_knee", "l_ankle", "r_eye", "l_eye", "r_ear", "l_ear",
        "l_big_toe", "l_small_toe", "l_heel", "r_big_toe", "r_small_toe", "r_heel",
    ),
    (
        (1, 8), (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (10, 11), (8, 12),
        (12, 13), (13, 14), (1, 0), (0, 15), (15, 17), (0, 16), (16, 18), (14, 19), (19, 20), (14, 21),
        (11, 22), (22, 23), (11, 24),
    ),
)

MPII16 = PoseFormat(
    "mpii16",
    (
        "r_ankle", "r_knee", "r_hip", "l_hip", "l_knee", "l_ankle", "pelvis", "thorax", "upper_neck",
        "head_top", "r_wrist", "r_elbow", "r_shoulder", "l_shoulder", "l_elbow", "l_wrist",
    ),
    (
        (0, 1), (1, 2), (2, 6), (6, 3), (3, 4), (4, 5), (6, 7), (7, 8), (8, 9), (7, 12), (12, 11),
        (11, 10), (7, 13), (13, 14), (14, 15),
    ),
)

POSE_FORMATS: dict[str, PoseFormat] = {f.name: f for f in (COCO18, BODY25, MPII16)}

# A conversion lists, for each target joint, the source joints it is built from: one index copies a
# joint, several are averaged (all must be present), none leaves the target missing.
_Recipe = tuple[tuple[int, ...], ...]

_CONVERSIONS: dict[tuple[str, str], _Recipe] = {
    # MGD's get_coco_body25_mapping: identical up to l_wrist, then skip mid_hip; feet are dropped.
    ("body25", "coco18"): tuple((i,) for i in range(8)) + tuple((i,) for i in range(9, 19)),
    # MPII has no face joints; OpenPose's neck (between the shoulders) is MPII's thorax.
    ("mpii16", "coco18"): (
        (), (7,), (12,), (11,), (10,), (13,), (14,), (15,), (2,), (1,), (0,), (3,), (4,), (5,),
        (), (), (), (),
    ),
    # Pelvis is the hip midpoint; upper neck and head top have no COCO counterpart.
    ("coco18", "mpii16"): (
        (10,), (9,), (8,), (11,), (12,), (13,), (8, 11), (1,), (), (), (4,), (3,), (2,), (5,), (6,), (7,),
    ),
}


def pose_format(name: str) -> PoseFormat:
    """Look up a format by name (``coco18``, ``body25``, ``mpii16``)."""
    try:
        return POSE_FORMATS[name]
    except KeyError:
        raise DataError(f"unknown pose format {name!r}; expected one of {sorted(POSE_FORMATS)}") from None


def as_keypoints(values: object, fmt: str | None = None, where: str = "<keypoints>") -> np.ndarray:
    """Validate keypoints and return them as float32 ``(K, 3)`` ``[x, y, confidence]`` rows.

    Accepts ``(K, 2)`` (confidence 1), ``(K, 3)``, ``(K, 4)`` (Dress Code's trailing joint id is
    dropped) or OpenPose's flat ``[x, y, c] * K`` list. With ``fmt`` the joint count is checked too, so
    a BODY_25 array passed where COCO-18 is expected fails here rather than deep inside a model.
    """
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: keypoints are not numeric ({exc})") from exc
    if arr.ndim == 1 and arr.size % 3 == 0 and arr.size > 0:
        arr = arr.reshape(-1, 3)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3, 4):
        raise DataError(f"{where}: keypoints must have shape (K, 2|3|4) or (3K,), got {arr.shape}")
    if arr.shape[1] == 2:
        arr = np.concatenate([arr, np.ones((len(arr), 1), np.float32)], axis=1)
    arr = np.ascontiguousarray(arr[:, :3])
    if fmt is not None and len(arr) != pose_format(fmt).num_joints:
        raise DataError(f"{where}: {fmt} needs {pose_format(fmt).num_joints} keypoints, got {len(arr)}")
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: keypoints contain NaN or infinity")
    return arr


def convert_keypoints(keypoints: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert ``(K, 3)`` keypoints from format ``src`` to ``dst``; unmappable joints get confidence 0."""
    kp = as_keypoints(keypoints, src)
    if src == dst:
        return kp.copy()
    try:
        recipe = _CONVERSIONS[(src, dst)]
    except KeyError:
        known = sorted(f"{a}->{b}" for a, b in _CONVERSIONS)
        raise DataError(f"no keypoint conversion {src}->{dst}; available: {known}") from None
    out = np.zeros((len(recipe), 3), np.float32)
    for target, sources in enumerate(recipe):
        if sources and all(kp[s, 2] > 0 for s in sources):
            out[target, :2] = kp[list(sources), :2].mean(axis=0)
            out[target, 2] = kp[list(sources), 2].min()
    return out


def rescale_keypoints(
    keypoints: np.ndarray, src_size: tuple[int, int], dst_size: tuple[int, int]
) -> np.ndarray:
    """Move keypoints from a ``(width, height)`` frame to another, e.g. Dress Code's 384x512 to 768x1024.

    Missing joints keep confidence 0 (their coordinates are scaled too but carry no meaning).
    """
    kp = as_keypoints(keypoints).copy()
    kp[:, 0] *= dst_size[0] / src_size[0]
    kp[:, 1] *= dst_size[1] / src_size[1]
    return kp


def default_sigma(height: int) -> float:
    """Heatmap width used by MGD/Fashion-RAG (sigma 9 at 512 px height), scaled to ``height``."""
    return 9.0 * height / 512.0


def keypoint_heatmaps(
    keypoints: np.ndarray, size: tuple[int, int], sigma: float | None = None
) -> torch.Tensor:
    """One Gaussian ``exp(-d^2 / sigma^2)`` channel per joint, as a float32 ``(K, height, width)`` tensor.

    ``size`` is ``(height, width)`` and keypoints must already be in that frame (see
    :func:`rescale_keypoints`). A missing joint gives an all-zero channel. A joint outside the frame is
    not clamped: only its Gaussian tail (often nothing) reaches the image, which is what a crop that
    cut the joint off should produce.
    """
    kp = torch.from_numpy(as_keypoints(keypoints))
    height, width = size
    sigma = default_sigma(height) if sigma is None else float(sigma)
    if sigma <= 0:
        raise DataError(f"heatmap sigma must be positive, got {sigma}")
    ys = torch.arange(height, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, width)
    d2 = (xs - kp[:, 0].view(-1, 1, 1)) ** 2 + (ys - kp[:, 1].view(-1, 1, 1)) ** 2
    maps = torch.exp(-d2 / sigma**2)
    return maps * (kp[:, 2] > 0).float().view(-1, 1, 1)


def _limb_color(i: int, n: int) -> tuple[int, int, int]:
    """Distinct, stable hue per limb so left and right stay distinguishable in the rendering."""
    hue = Image.new("HSV", (1, 1), (int(255 * i / max(n, 1)), 255, 255))
    return hue.convert("RGB").getpixel((0, 0))


def render_skeleton(
    keypoints: np.ndarray,
    size: tuple[int, int],
    fmt: str = "coco18",
    line_width: int | None = None,
) -> Image.Image:
    """Draw the skeleton on a black RGB image of ``size`` ``(width, height)``, OpenPose-style.

    Limbs with a missing end are skipped; joints are dots. The width defaults to 1% of the height so a
    rendering at any resolution looks alike.
    """
    pose = pose_format(fmt)
    kp = as_keypoints(keypoints, fmt)
    width, height = size
    lw = line_width or max(1, round(height / 100))
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    for i, (a, b) in enumerate(pose.edges):
        if kp[a, 2] > 0 and kp[b, 2] > 0:
            draw.line([tuple(kp[a, :2]), tuple(kp[b, :2])], fill=_limb_color(i, len(pose.edges)), width=lw)
    for j, (x, y, c) in enumerate(kp):
        if c > 0:
            draw.ellipse((x - lw, y - lw, x + lw, y + lw), fill=_limb_color(j, pose.num_joints))
    return img
