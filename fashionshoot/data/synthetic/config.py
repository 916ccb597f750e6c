"""The synthetic set's knobs, as one typed config (written next to the data as ``synthetic.json``)."""

from __future__ import annotations

from dataclasses import dataclass

from fashionshoot.data.synthetic.styles import STYLES
from fashionshoot.data.synthetic.vocab import CATEGORIES, COLOURS, PATTERNS
from fashionshoot.errors import ConfigError


@dataclass(frozen=True)
class SyntheticConfig:
    """What to generate. Every image is a pure function of this config and its index.

    Sizes are (height, width) in pixels. ``figure_scale`` is the figure's height as a fraction of
    the lookbook height (above 1 the figure is cropped by the frame, as in editorial close-ups).
    ``framing_jitter`` is the (x, y) standard deviation of the garment's place in the frame around the
    centre, as fractions of width and height: raise it to make the pose decide where the figure stands.
    ``heldout_categories`` puts every garment of those categories in the test split (zero-shot
    category split) on top of the random ``test_fraction`` of garments. With ``outfit`` the other
    garments a figure wears are random (distractors); without it they are plain dark grey.
    """

    seed: int = 0
    num_garments: int = 100
    lookbooks_per_garment: int = 3
    garment_size: tuple[int, int] = (128, 128)
    lookbook_size: tuple[int, int] = (128, 96)
    categories: tuple[str, ...] = CATEGORIES
    test_fraction: float = 0.2
    heldout_categories: tuple[str, ...] = ()
    styles: tuple[str, ...] = STYLES
    occlusion_prob: float = 0.5
    outfit: bool = True
    clutter: tuple[int, int] = (3, 9)
    figure_scale: tuple[float, float] = (0.8, 1.4)
    max_rotation: float = 15.0
    framing_jitter: tuple[float, float] = (0.1, 0.08)
    supersample: int = 2

    def __post_init__(self) -> None:
        def fail(key: str, why: str) -> None:
            raise ConfigError(f"synthetic.{key}: {why} (got {getattr(self, key)!r})")

        if self.num_garments < 1:
            fail("num_garments", "must be at least 1")
        if self.lookbooks_per_garment < 1:
            fail("lookbooks_per_garment", "must be at least 1")
        for key in ("garment_size", "lookbook_size"):
            size = getattr(self, key)
            if len(size) != 2 or min(size) < 32:
                fail(key, "must be (height, width), each at least 32 pixels")
        if not self.categories or set(self.categories) - set(CATEGORIES) or len(set(self.categories)) != len(self.categories):
            fail("categories", f"must be distinct names from {CATEGORIES}")
        if set(self.heldout_categories) - set(self.categories):
            fail("heldout_categories", "must be a subset of categories")
        if not 0.0 <= self.test_fraction < 1.0:
            fail("test_fraction", "must be in [0, 1)")
        if not self.styles or set(self.styles) - set(STYLES) or len(set(self.styles)) != len(self.styles):
            fail("styles", f"must be distinct names from {STYLES}")
        if not 0.0 <= self.occlusion_prob <= 1.0:
            fail("occlusion_prob", "must be in [0, 1]")
        if len(self.clutter) != 2 or not 0 <= self.clutter[0] <= self.clutter[1] <= 40:
            fail("clutter", "must be (min, max) shape counts with 0 <= min <= max <= 40")
        if len(self.figure_scale) != 2 or not 0.3 <= self.figure_scale[0] <= self.figure_scale[1] <= 3.0:
            fail("figure_scale", "must be (min, max) with 0.3 <= min <= max <= 3")
        if len(self.framing_jitter) != 2 or not all(0.0 <= j <= 0.5 for j in self.framing_jitter):
            fail("framing_jitter", "must be (x, y) fractions of width and height, each in [0, 0.5]")
        if not 0.0 <= self.max_rotation <= 90.0:
            fail("max_rotation", "must be in [0, 90] degrees")
        if not 1 <= self.supersample <= 4:
            fail("supersample", "must be 1, 2, 3 or 4")

    @property
    def num_identities(self) -> int:
        """How many garments get a unique (category, colour, pattern) combination."""
        return len(self.categories) * len(COLOURS) * len(PATTERNS)
