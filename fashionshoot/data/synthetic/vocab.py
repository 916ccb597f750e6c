"""The closed vocabulary of the synthetic catalogue: categories, colours, patterns, shapes, brands.

Garment identity is a *combination* of these words. Each list is deliberately short so that many
garments share a colour, a pattern or a shape: no single attribute identifies a garment, which is
what makes retrieval on the synthetic set a real (if small) problem rather than colour matching.
"""

from __future__ import annotations

CATEGORIES: tuple[str, ...] = ("top", "outerwear", "dress", "trousers", "skirt")

#: Named fabric colours (sRGB). Names appear in titles and captions.
COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (32, 32, 36),
    "cream": (236, 224, 196),
    "grey": (138, 140, 146),
    "navy": (30, 42, 92),
    "sky blue": (118, 170, 226),
    "teal": (22, 122, 128),
    "emerald": (22, 132, 74),
    "olive": (112, 116, 52),
    "mustard": (214, 168, 40),
    "orange": (236, 118, 36),
    "red": (200, 32, 42),
    "burgundy": (116, 26, 48),
    "pink": (240, 152, 182),
    "lavender": (174, 150, 214),
    "camel": (190, 146, 96),
    "brown": (98, 64, 40),
}

PATTERNS: tuple[str, ...] = (
    "solid", "stripes", "vertical_stripes", "gingham", "windowpane", "dots", "chevron", "diagonal",
)

#: Pattern -> (title adjective, caption noun phrase); the caption phrase takes scale and accent colour.
PATTERN_WORDS: dict[str, tuple[str, str]] = {
    "solid": ("", "solid colour"),
    "stripes": ("striped", "horizontal stripes"),
    "vertical_stripes": ("vertical-stripe", "vertical stripes"),
    "gingham": ("gingham", "gingham check"),
    "windowpane": ("windowpane-check", "windowpane check"),
    "dots": ("polka-dot", "polka dots"),
    "chevron": ("chevron", "chevron zigzags"),
    "diagonal": ("diagonal-stripe", "diagonal stripes"),
}

#: Pattern scale name -> repeat period in figure units (a figure is about 1 unit tall).
PATTERN_SCALES: dict[str, float] = {"fine": 0.045, "medium": 0.065, "bold": 0.095}

#: Per category, the shape options a garment samples from (one value per key).
SHAPE_OPTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "top": {
        "sleeve": ("none", "short", "elbow", "long"),
        "length": ("cropped", "regular", "longline"),
        "fit": ("slim", "regular", "oversized"),
        "neckline": ("crew", "v-neck"),
    },
    "outerwear": {
        "sleeve": ("elbow", "long"),
        "length": ("cropped", "regular", "long"),
        "fit": ("regular", "oversized"),
        "neckline": ("open",),
    },
    "dress": {
        "sleeve": ("none", "short", "long"),
        "length": ("mini", "knee", "midi", "maxi"),
        "fit": ("fitted", "a-line", "flared"),
        "neckline": ("crew", "v-neck"),
    },
    "trousers": {
        "sleeve": ("none",),
        "length": ("shorts", "cropped", "full"),
        "fit": ("skinny", "straight", "wide"),
        "neckline": ("none",),
    },
    "skirt": {
        "sleeve": ("none",),
        "length": ("mini", "knee", "midi"),
        "fit": ("pencil", "a-line", "flared"),
        "neckline": ("none",),
    },
}

#: Invented brand names (no real brands), one sampled per garment.
BRANDS: tuple[str, ...] = (
    "Acme", "Northwind", "Maison Vela", "Kora", "Juniper & Co", "Atelier Nord", "Sable", "Lumen",
    "Orla", "Fenwick", "Tessel", "Rue Margot",
)

#: Skin and hair tones of the figures (not part of garment identity).
SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (241, 204, 176), (224, 172, 135), (198, 140, 100), (160, 104, 70), (118, 76, 52), (84, 56, 40),
)
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (24, 20, 18), (70, 46, 30), (130, 90, 50), (200, 160, 90), (150, 60, 30), (170, 170, 170),
)
