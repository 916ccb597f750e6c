"""Random access to the synthetic set: any garment or lookbook, by index, in any order.

Every item draws from its own random stream seeded by ``(seed, stream, index...)``, so item
``(i, j)`` is the same whether it is generated first, last, alone, or in another process; that is
what makes the set shardable and lets a test regenerate a single image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from fashionshoot.data.synthetic.config import SyntheticConfig
from fashionshoot.data.synthetic.garments import GarmentSpec, identity_slots, sample_garment
from fashionshoot.data.synthetic.scenes import compose_lookbook, render_product
from fashionshoot.data.synthetic.styles import render_flat, render_real

# Independent random streams per kind of item.
_IDENTITIES, _GARMENT, _LOOKBOOK, _SPLIT, _CAMERA = range(5)


@dataclass(frozen=True)
class Lookbook:
    """One lookbook scene in one or more styles; all styles share keypoints and crop box."""

    garment_id: str
    lookbook_id: str
    images: dict[str, Image.Image]
    keypoints: np.ndarray
    crop_box: tuple[float, float, float, float]
    info: dict[str, Any]


class SyntheticFashion:
    """The procedural garment/lookbook set defined by a :class:`SyntheticConfig`."""

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = config or SyntheticConfig()
        slots = identity_slots(self.config.categories)
        order = self._rng(_IDENTITIES).permutation(len(slots))
        self._slots = [slots[k] for k in order]

    def __len__(self) -> int:
        """Number of garment-lookbook pairs."""
        return self.config.num_garments * self.config.lookbooks_per_garment

    def _rng(self, stream: int, *index: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, stream, *index])

    def _check(self, i: int, j: int = 0) -> None:
        if not 0 <= i < self.config.num_garments:
            raise IndexError(f"garment index {i} outside [0, {self.config.num_garments})")
        if not 0 <= j < self.config.lookbooks_per_garment:
            raise IndexError(f"lookbook index {j} outside [0, {self.config.lookbooks_per_garment})")

    @staticmethod
    def garment_id(i: int) -> str:
        return f"g{i:05d}"

    @staticmethod
    def lookbook_id(i: int, j: int) -> str:
        return f"g{i:05d}-l{j:02d}"

    def garment(self, i: int) -> GarmentSpec:
        """Garment ``i``. The first ``config.num_identities`` garments have pairwise different
        (category, colour, pattern); later ones reuse combinations with other shapes and accents."""
        self._check(i)
        category, colour, pattern = self._slots[i % len(self._slots)]
        return sample_garment(self._rng(_GARMENT, i), self.garment_id(i), category, colour, pattern)

    def split(self, i: int) -> str:
        """``"test"`` or ``"train"``, per garment: a test garment never appears in training pairs."""
        spec = self.garment(i)
        if spec.category in self.config.heldout_categories:
            return "test"
        return "test" if self._rng(_SPLIT, i).random() < self.config.test_fraction else "train"

    def render_garment(self, garment: int | GarmentSpec) -> Image.Image:
        """The product shot of a garment (by index or spec)."""
        spec = self.garment(garment) if isinstance(garment, int) else garment
        return render_product(spec, self.config.garment_size, self.config.supersample)

    def lookbook(self, i: int, j: int, styles: tuple[str, ...] | None = None) -> Lookbook:
        """Lookbook ``j`` of garment ``i``, rendered in ``styles`` (default: the config's styles)."""
        self._check(i, j)
        scene = compose_lookbook(self.garment(i), self.config, self._rng(_LOOKBOOK, i, j))
        images = {}
        for style in styles or self.config.styles:
            if style == "rendered":
                images[style] = render_flat(scene.flat, self.config.supersample)
            elif style == "real":
                camera = self._rng(_CAMERA, i, j)
                images[style] = render_real(scene.flat, scene.shading, self.config.supersample, camera)
            else:
                raise ValueError(f"unknown style {style!r}; expected 'real' or 'rendered'")
        return Lookbook(self.garment_id(i), self.lookbook_id(i, j), images, scene.keypoints,
                        scene.crop_box, scene.info)

    def render_lookbook(
        self, i: int, j: int, style: str = "real"
    ) -> tuple[Image.Image, np.ndarray, tuple[float, float, float, float]]:
        """(image, COCO-18 keypoints (18, 3), garment crop box) of lookbook ``j`` of garment ``i``."""
        lookbook = self.lookbook(i, j, (style,))
        return lookbook.images[style], lookbook.keypoints, lookbook.crop_box
