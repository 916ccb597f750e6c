"""Face Synthetics (Microsoft, ICCV 2021) reader: the rendered-face domain used by FashionR2R.

Flat layout, one triple per subject (512x512)::

    dataset_100000/
      000000.png  000000_seg.png  000000_ldmks.txt     # 70 rows "x y": iBUG-68 + 2 pupils
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from fashionshoot.data.images import load_image
from fashionshoot.data.sets._common import (
    PublicDataset,
    SampleTransform,
    as_float_array,
    check_listed,
    list_names,
    load_label_map,
)
from fashionshoot.errors import DataError

SEG_CLASSES: tuple[str, ...] = (
    "background", "skin", "nose", "r_eye", "l_eye", "r_brow", "l_brow", "r_ear", "l_ear",
    "mouth_interior", "top_lip", "bottom_lip", "neck", "hair", "beard", "clothing", "glasses",
    "headwear", "facewear",
)
#: Segmentation value for pixels no class applies to.
IGNORE_LABEL = 255
NUM_LANDMARKS = 70

_IMAGE_NAME = re.compile(r"(\d+)\.png")


def read_landmarks(path: Path) -> np.ndarray:
    """The 70 ``x y`` rows of a ``*_ldmks.txt`` file as float32 ``(70, 2)``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DataError(f"{path}: cannot read landmarks ({exc})") from exc
    pts = as_float_array(text.split(), 2, str(path)) if text.strip() else np.zeros((0, 2), np.float32)
    if len(pts) != NUM_LANDMARKS:
        raise DataError(f"{path}: expected {NUM_LANDMARKS} 'x y' rows, got {len(pts)}")
    return pts


class FaceSynthetics(PublicDataset):
    """Map-style reader. Sample keys: ``id``, ``image`` (PIL RGB), ``segmentation`` (PIL, ids in
    :data:`SEG_CLASSES` or 255) and ``landmarks`` (float32 ``(70, 2)`` in image pixels)."""

    name = "facesynthetics"

    def __init__(self, root: str | Path, transform: SampleTransform | None = None) -> None:
        super().__init__(root, transform)
        names = list_names(self.root)
        ids = sorted(m.group(1) for n in names if (m := _IMAGE_NAME.fullmatch(n)))
        if not ids:
            raise DataError(f"{self.root}: no '<id>.png' images found")
        check_listed(self.root, self.root, (f"{i}_seg.png" for i in ids), names)
        check_listed(self.root, self.root, (f"{i}_ldmks.txt" for i in ids), names)
        self._index: list[str] = ids

    def _load(self, sid: str) -> dict[str, Any]:
        return {
            "id": sid,
            "image": load_image(self.root / f"{sid}.png"),
            "segmentation": load_label_map(self.root / f"{sid}_seg.png"),
            "landmarks": read_landmarks(self.root / f"{sid}_ldmks.txt"),
        }
