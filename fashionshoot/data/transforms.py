"""Resize / pad / crop / normalise helpers shared by every reader.

One rule everywhere: photos resize bilinearly, label maps and binary masks with NEAREST (interpolating
class ids invents classes), and keypoints follow the same geometry. Each geometric helper therefore
returns the :class:`Affine` it applied so callers can move keypoints and boxes with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class Affine:
    """``new = old * scale + offset`` per axis, as applied by a resize/pad/crop."""

    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    def apply_points(self, points: np.ndarray) -> np.ndarray:
        """Map ``(K, >=2)`` point rows (extra columns such as confidence are kept)."""
        out = np.array(points, dtype=np.float32, copy=True)
        out[:, 0] = out[:, 0] * self.scale_x + self.offset_x
        out[:, 1] = out[:, 1] * self.scale_y + self.offset_y
        return out

    def apply_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """Map ``[x1, y1, x2, y2]`` boxes (shape ``(4,)`` or ``(N, 4)``) as their two corners, so a pad
        offset moves them as it moves points (scaling alone would leave them beside the object)."""
        arr = np.asarray(boxes, dtype=np.float32)
        corners = self.apply_points(arr.reshape(-1, 2))
        return corners.reshape(arr.shape)


def _resample(label: bool) -> Image.Resampling:
    return Image.Resampling.NEAREST if label else Image.Resampling.BILINEAR


def resize(img: Image.Image, size: tuple[int, int], label: bool = False) -> tuple[Image.Image, Affine]:
    """Resize to exactly ``size`` ``(width, height)`` (aspect not kept)."""
    w, h = img.size
    return img.resize(size, _resample(label)), Affine(size[0] / w, size[1] / h)


def resize_keep_aspect(
    img: Image.Image, max_size: tuple[int, int], label: bool = False
) -> tuple[Image.Image, Affine]:
    """Largest resize that fits inside ``max_size`` ``(width, height)`` without distorting the image."""
    w, h = img.size
    s = min(max_size[0] / w, max_size[1] / h)
    new = (max(1, round(w * s)), max(1, round(h * s)))
    return img.resize(new, _resample(label)), Affine(new[0] / w, new[1] / h)


def resize_and_pad(
    img: Image.Image, size: tuple[int, int], label: bool = False, fill: int | tuple[int, ...] = 0
) -> tuple[Image.Image, Affine]:
    """Fit inside ``size`` keeping aspect, then centre on a ``fill`` canvas of exactly ``size``."""
    small, aff = resize_keep_aspect(img, size, label)
    canvas = Image.new(img.mode, size, fill)
    if img.mode == "P" and img.getpalette():
        canvas.putpalette(img.getpalette())
    ox, oy = (size[0] - small.width) // 2, (size[1] - small.height) // 2
    canvas.paste(small, (ox, oy))
    return canvas, Affine(aff.scale_x, aff.scale_y, ox, oy)


def center_crop(img: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, Affine]:
    """Crop the central ``size`` ``(width, height)`` window (no resampling, so no label flag)."""
    w, h = img.size
    left, top = (w - size[0]) // 2, (h - size[1]) // 2
    return img.crop((left, top, left + size[0], top + size[1])), Affine(offset_x=-left, offset_y=-top)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB/L image -> float32 ``(C, H, W)`` in ``[-1, 1]`` (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def label_to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """Label map -> int64 ``(H, W)`` class ids (no scaling)."""
    return torch.from_numpy(np.array(img, dtype=np.int64))


@dataclass
class ResizeSample:
    """Sample transform for the readers: resize to ``size`` (``(width, height)``) and tensorise.

    Keys in ``image_keys`` become ``[-1, 1]`` tensors, keys in ``label_keys`` (PIL or numpy) int64 maps
    (NEAREST), and keys in ``point_keys`` (``(K, >=2)`` rows) and ``box_keys`` (``[x1, y1, x2, y2]``) are
    moved with the image geometry. ``pad=True`` keeps the
    aspect ratio and pads (needed when the source is not already ``size``'s shape). Keys absent from a
    sample are ignored.
    """

    size: tuple[int, int]
    pad: bool = False
    image_keys: tuple[str, ...] = ("image", "cloth", "skeleton")
    label_keys: tuple[str, ...] = ("label_map", "parse", "cloth_mask", "segmentation", "inpaint_mask")
    point_keys: tuple[str, ...] = ("keypoints", "keypoints_body25", "landmarks")
    box_keys: tuple[str, ...] = ("bbox",)
    geometry_key: str = "image"

    def _geom(self, img: Image.Image, label: bool) -> tuple[Image.Image, Affine]:
        return resize_and_pad(img, self.size, label) if self.pad else resize(img, self.size, label)

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        aff: Affine | None = None
        for key in self.image_keys:
            if key in out:
                out[key], a = self._geom(out[key], label=False)
                aff = a if key == self.geometry_key else aff
        for key in self.label_keys:
            if key in out:
                value = out[key]
                if isinstance(value, np.ndarray):  # e.g. a computed bool mask
                    value = Image.fromarray(value.astype(np.uint8))
                out[key] = label_to_tensor(self._geom(value, label=True)[0])
        for key in self.image_keys:
            if key in out:
                out[key] = to_tensor(out[key])
        if aff is not None:
            for key in self.point_keys:
                if key in out:
                    out[key] = aff.apply_points(out[key])
            for key in self.box_keys:
                if key in out:
                    out[key] = aff.apply_boxes(out[key])
        return out
