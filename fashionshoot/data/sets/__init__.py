"""Readers for public datasets, each a map-style torch ``Dataset`` of per-sample dicts.

Point a reader at a local copy (nothing is ever downloaded); see docs/datasets.md for the layouts.
"""

from __future__ import annotations

from fashionshoot.data.sets.deepfashion2 import DeepFashion2
from fashionshoot.data.sets.dresscode import DressCode
from fashionshoot.data.sets.facesynthetics import FaceSynthetics
from fashionshoot.data.sets.synfashion import SynFashion
from fashionshoot.data.sets.vitonhd import VitonHD

__all__ = ["DeepFashion2", "DressCode", "FaceSynthetics", "SynFashion", "VitonHD"]
