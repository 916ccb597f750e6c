"""Garment identities: sampling a :class:`GarmentSpec` and describing it in words.

A garment is a category, a shape (sleeve, length, fit, neckline), a base colour, a pattern with an
accent colour and scale, and a brand. Titles and captions are generated from exactly these fields, so
text-to-garment retrieval on the synthetic set has a known right answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fashionshoot.data.synthetic.vocab import (
    BRANDS,
    COLOURS,
    PATTERN_SCALES,
    PATTERN_WORDS,
    PATTERNS,
    SHAPE_OPTIONS,
)

#: Minimum RGB distance between base and accent colour, so every pattern stays visible.
_MIN_ACCENT_CONTRAST = 100.0
#: Per-channel jitter of a garment's exact RGB around its named colour (dye-lot variation).
_RGB_JITTER = 6


@dataclass(frozen=True)
class GarmentSpec:
    """Everything that defines one garment; rendering it twice gives the same pixels."""

    garment_id: str
    category: str
    colour: str
    rgb: tuple[int, int, int]
    pattern: str
    accent: str | None
    accent_rgb: tuple[int, int, int] | None
    pattern_scale: str | None
    sleeve: str
    length: str
    fit: str
    neckline: str
    brand: str

    @property
    def period(self) -> float:
        """Pattern repeat in figure units (the pattern is sized to the body, not to the image)."""
        return PATTERN_SCALES[self.pattern_scale or "medium"]

    @property
    def noun(self) -> str:
        """The product-type noun of the title ("long-sleeve top", "midi flared skirt", ...)."""
        return _noun(self)

    @property
    def title(self) -> str:
        adjective = PATTERN_WORDS[self.pattern][0]
        words = [self.brand, adjective, self.noun, "in", self.colour]
        return " ".join(w for w in words if w)

    @property
    def caption(self) -> str:
        """A one-sentence description naming every identity attribute (for text -> garment search)."""
        details = []
        if self.category in ("top", "outerwear", "dress"):
            cut = f"{'an' if self.fit[0] in 'aeiou' else 'a'} {self.fit} cut"
            details = [_SLEEVE_PHRASE[self.sleeve], _NECK_PHRASE[self.neckline], cut]
        if self.pattern == "solid":
            look = "in a solid colour"
        else:
            look = f"patterned with {self.pattern_scale} {self.accent} {PATTERN_WORDS[self.pattern][1]}"
        head = f"{self.colour} {self.noun}"
        if self.category == "trousers":
            head = f"pair of {head}"
        article = "An" if head[0] in "aeiou" else "A"
        with_details = f" with {', '.join(details[:-1])} and {details[-1]}" if details else ""
        return f"{article} {head}{with_details}, {look}. By {self.brand}."

    def attributes(self) -> dict[str, Any]:
        """Identity attributes as plain JSON values (stored in catalogue and pair metadata)."""
        return {
            "category": self.category,
            "colour": self.colour,
            "rgb": list(self.rgb),
            "pattern": self.pattern,
            "accent": self.accent,
            "accent_rgb": list(self.accent_rgb) if self.accent_rgb else None,
            "pattern_scale": self.pattern_scale,
            "sleeve": self.sleeve,
            "length": self.length,
            "fit": self.fit,
            "neckline": self.neckline,
        }

    def catalogue_entry(self) -> dict[str, Any]:
        """The catalogue (garments.jsonl) view of this garment."""
        return {
            "garment_id": self.garment_id,
            "brand": self.brand,
            "title": self.title,
            "category": self.category,
            "caption": self.caption,
            "attributes": self.attributes(),
        }


_SLEEVE_PHRASE = {"none": "no sleeves", "short": "short sleeves", "elbow": "elbow-length sleeves",
                  "long": "long sleeves"}
_NECK_PHRASE = {"crew": "a crew neck", "v-neck": "a v-neck", "open": "an open front"}
_LENGTH_WORD = {"mini": "mini", "knee": "knee-length", "midi": "midi", "maxi": "maxi"}
_LEG_WORD = {"skinny": "skinny", "straight": "straight-leg", "wide": "wide-leg"}


def _noun(spec: GarmentSpec) -> str:
    if spec.category == "top":
        sleeve = {"none": "tank top", "short": "t-shirt", "elbow": "three-quarter-sleeve top",
                  "long": "long-sleeve top"}[spec.sleeve]
        return f"{spec.length} {sleeve}" if spec.length != "regular" else sleeve
    if spec.category == "outerwear":
        return {"cropped": "cropped jacket", "regular": "jacket", "long": "coat"}[spec.length]
    if spec.category == "dress":
        return f"{_LENGTH_WORD[spec.length]} dress"
    if spec.category == "trousers":
        noun = {"shorts": "shorts", "cropped": "cropped trousers", "full": "trousers"}[spec.length]
        return f"{_LEG_WORD[spec.fit]} {noun}"
    return f"{_LENGTH_WORD[spec.length]} {spec.fit} skirt"


def identity_slots(categories: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """Every (category, colour, pattern) combination, in a fixed order, for unique assignment."""
    return [(c, col, p) for c in categories for col in COLOURS for p in PATTERNS]


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    shifted = np.clip(np.asarray(rgb) + rng.integers(-_RGB_JITTER, _RGB_JITTER + 1, size=3), 0, 255)
    return (int(shifted[0]), int(shifted[1]), int(shifted[2]))


def sample_garment(
    rng: np.random.Generator, garment_id: str, category: str, colour: str, pattern: str
) -> GarmentSpec:
    """Fill in accent colour, pattern scale, shape and brand of a garment with the given slot."""
    accent = accent_rgb = scale = None
    if pattern != "solid":
        base = np.asarray(COLOURS[colour], dtype=float)
        options = [name for name, rgb in COLOURS.items()
                   if np.linalg.norm(np.asarray(rgb) - base) >= _MIN_ACCENT_CONTRAST]
        accent = options[int(rng.integers(len(options)))]
        accent_rgb = _jitter(COLOURS[accent], rng)
        scales = tuple(PATTERN_SCALES)
        scale = scales[int(rng.integers(len(scales)))]
    shape = {key: values[int(rng.integers(len(values)))] for key, values in SHAPE_OPTIONS[category].items()}
    return GarmentSpec(
        garment_id=garment_id,
        category=category,
        colour=colour,
        rgb=_jitter(COLOURS[colour], rng),
        pattern=pattern,
        accent=accent,
        accent_rgb=accent_rgb,
        pattern_scale=scale,
        brand=BRANDS[int(rng.integers(len(BRANDS)))],
        **shape,
    )


def sample_random_garment(rng: np.random.Generator, category: str, garment_id: str = "") -> GarmentSpec:
    """A garment of ``category`` with random colour and pattern (outfit distractors, clutter)."""
    colours = tuple(COLOURS)
    colour = colours[int(rng.integers(len(colours)))]
    pattern = "solid" if rng.random() < 0.5 else PATTERNS[int(rng.integers(1, len(PATTERNS)))]
    return sample_garment(rng, garment_id, category, colour, pattern)
