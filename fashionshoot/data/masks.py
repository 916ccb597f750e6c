"""Inpainting masks from human-parsing label maps and keypoints (the Dress Code / LaDI / MGD recipe).

Try-on and garment-conditioned generation repaint the region a new garment may occupy and keep the
rest of the person. The region must be generous (a long sleeve may replace a bare arm; a high collar
may cover the neck) yet never touch identity cues (face, hair, shoes, bag). The recipe below is the one
shared by the Dress Code, LaDI-VTON, MGD and Fashion-RAG loaders, so masks made here match those
papers' inputs:

``inpaint = dilate(garment labels | arm band from keypoints 2-7 | neck) - fixed``

where ``fixed`` = hair, shoes, hat, sunglasses, scarf, bag, the head above the shoulder line, hands
(arm pixels outside the arm band), plus the garments of the other body half.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from fashionshoot.data.pose import as_keypoints
from fashionshoot.errors import DataError

#: ATR/SCHP label ids used by Dress Code's ``label_maps/*_4.png``.
DRESSCODE_LABELS: dict[str, int] = {
    "background": 0, "hat": 1, "hair": 2, "sunglasses": 3, "upper_clothes": 4, "skirt": 5, "pants": 6,
    "dress": 7, "belt": 8, "left_shoe": 9, "right_shoe": 10, "head": 11, "left_leg": 12,
    "right_leg": 13, "left_arm": 14, "right_arm": 15, "bag": 16, "scarf": 17,
}

CATEGORIES: tuple[str, ...] = ("dresses", "upper_body", "lower_body")

_L = DRESSCODE_LABELS
# Labels the new garment replaces (legs for dresses/trousers: a garment may be longer or shorter).
_GARMENT = {
    "dresses": (_L["dress"], _L["left_leg"], _L["right_leg"]),
    "upper_body": (_L["upper_clothes"],),
    "lower_body": (_L["pants"], _L["left_leg"], _L["right_leg"]),
}
_ALWAYS_FIXED = tuple(_L[k] for k in ("hair", "left_shoe", "right_shoe", "hat", "sunglasses", "scarf", "bag"))
# The other body half's garments stay as they are.
_FIXED_EXTRA = {
    "dresses": (),
    "upper_body": (_L["skirt"], _L["pants"]),
    "lower_body": (_L["upper_clothes"], _L["left_arm"], _L["right_arm"]),
}
_HEAD = tuple(_L[k] for k in ("hat", "hair", "sunglasses", "head"))
_ARMS = (_L["left_arm"], _L["right_arm"])
# COCO-18 joints the arm band runs through: l_wrist, l_elbow, l_shoulder | r_shoulder, r_elbow, r_wrist.
_LEFT_ARM, _RIGHT_ARM = (7, 6, 5), (2, 3, 4)


def dilate(mask: np.ndarray, kernel: int = 5, iterations: int = 5) -> np.ndarray:
    """Binary dilation with a square ``kernel`` repeated ``iterations`` times (cv2.dilate semantics)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    for _ in range(iterations):
        t = F.max_pool2d(t, kernel, stride=1, padding=kernel // 2)
    return t[0, 0].numpy() > 0


def _arm_band(keypoints: np.ndarray, shape: tuple[int, int], width: float) -> np.ndarray:
    """A thick polyline wrist-elbow-shoulder-shoulder-elbow-wrist; each arm stops at its first missing joint."""
    chain: list[tuple[float, float]] = []
    for side, reverse in ((_LEFT_ARM, True), (_RIGHT_ARM, False)):
        joints = side[::-1] if reverse else side  # walk outwards from the shoulder
        present = []
        for j in joints:
            if keypoints[j, 2] <= 0:
                break
            present.append((float(keypoints[j, 0]), float(keypoints[j, 1])))
        chain.extend(present[::-1] if reverse else present)
    img = Image.new("L", (shape[1], shape[0]))
    if len(chain) >= 2:
        ImageDraw.Draw(img).line(chain, fill=255, width=max(1, round(width)), joint="curve")
    return np.asarray(img) > 0


def _head_above_shoulders(
    keypoints: np.ndarray, head: np.ndarray, margin: float
) -> np.ndarray:
    """Head pixels above the shoulder line raised by ``margin``; the rest of the head counts as neck."""
    shoulders = [keypoints[j, :2] for j in (2, 5) if keypoints[j, 2] > 0]
    if not shoulders:
        return head.copy()
    (x0, y0), (x1, y1) = shoulders[0], shoulders[-1]
    slope = (y1 - y0) / (x1 - x0) if abs(x1 - x0) > 1e-6 else 0.0
    cols = np.arange(head.shape[1], dtype=np.float32)
    line_y = y0 + slope * (cols - x0) - margin
    rows = np.arange(head.shape[0], dtype=np.float32)[:, None]
    return head & (rows < line_y[None, :])


def dresscode_inpaint_mask(
    label_map: np.ndarray,
    keypoints: np.ndarray,
    category: str,
    variant: Literal["mask", "bounding_box"] = "mask",
) -> np.ndarray:
    """Boolean ``(H, W)`` mask, True where the garment of ``category`` may be repainted.

    ``label_map`` holds :data:`DRESSCODE_LABELS` ids; ``keypoints`` are COCO-18 rows in the label
    map's own pixels (confidence 0 = missing). The arm band (width ``45 * H / 512``) and the neck only
    apply to ``dresses`` and ``upper_body``. ``variant="bounding_box"`` fills the mask's bounding box
    (a shape-agnostic mask that does not leak the old garment's silhouette), still minus ``fixed``.
    """
    labels = np.asarray(label_map)
    if labels.ndim != 2:
        raise DataError(f"label map must be 2-D (H, W), got shape {labels.shape}")
    if category not in CATEGORIES:
        raise DataError(f"category {category!r}: expected one of {CATEGORIES}")
    if variant not in ("mask", "bounding_box"):
        raise DataError(f"mask variant {variant!r}: expected 'mask' or 'bounding_box'")
    kp = as_keypoints(keypoints, "coco18")
    scale = labels.shape[0] / 512.0

    garment = np.isin(labels, _GARMENT[category])
    fixed = np.isin(labels, _ALWAYS_FIXED + _FIXED_EXTRA[category])
    if category != "lower_body":
        band = _arm_band(kp, labels.shape, 45 * scale)
        head = np.isin(labels, _HEAD)
        head_kept = _head_above_shoulders(kp, head, 20 * scale)
        hands = np.isin(labels, _ARMS) & ~band
        garment |= band | (head & ~head_kept)
        fixed |= hands | head_kept

    region = dilate(garment)
    if variant == "bounding_box" and region.any():
        ys, xs = np.nonzero(region)
        region = np.zeros_like(region)
        region[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    return region & ~fixed
