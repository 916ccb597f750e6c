"""Procedural garment / lookbook pairs: the embedded default dataset (no downloads, CPU, seconds).

Product shots of garments with distinct shape, colour and pattern, and lookbook photos of the same
garments worn by a posed figure (exact COCO-18 keypoints) in cluttered scenes, in a clean "rendered"
and a camera-like "real" style, with catalogue metadata and held-out garment splits. See
docs/synthetic.md.
"""

from __future__ import annotations

from fashionshoot.data.synthetic.config import SyntheticConfig
from fashionshoot.data.synthetic.dataset import Lookbook, SyntheticFashion
from fashionshoot.data.synthetic.figures import KEYPOINT_NAMES
from fashionshoot.data.synthetic.garments import GarmentSpec
from fashionshoot.data.synthetic.styles import STYLES
from fashionshoot.data.synthetic.vocab import BRANDS, CATEGORIES, COLOURS, PATTERNS
from fashionshoot.data.synthetic.writer import (
    STYLE_DIRS,
    load_synthetic_config,
    pair_record,
    write_synthetic_set,
)

__all__ = [
    "BRANDS", "CATEGORIES", "COLOURS", "KEYPOINT_NAMES", "PATTERNS", "STYLES", "STYLE_DIRS",
    "GarmentSpec", "Lookbook", "SyntheticConfig", "SyntheticFashion",
    "load_synthetic_config", "pair_record", "write_synthetic_set",
]
