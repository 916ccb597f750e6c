"""The garment-lookbook pair record: one schema for synthetic, retrieved and public-set pairs.

A pair links one catalogue garment image to one lookbook (editorial / on-model) image that shows it.
Pairs mined by retrieval carry per-model scores, a fused confidence and a quality tier; ground-truth
pairs (synthetic set, Dress Code, VITON-HD) are tier ``high`` with confidence 1.0.
See docs/pair-format.md for the on-disk forms (JSONL / Parquet manifest, WebDataset shards).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from fashionshoot.errors import DataError

#: Quality tiers, best first. "Nested" selection of tier t means every tier at least as good as t.
TIERS: tuple[str, ...] = ("high", "medium", "low")


def tiers_at_least(tier: str) -> tuple[str, ...]:
    """All tiers as good as or better than ``tier`` (nested selection): ``medium`` -> (high, medium)."""
    if tier not in TIERS:
        raise DataError(f"tier {tier!r}: expected one of {TIERS}")
    return TIERS[: TIERS.index(tier) + 1]


@dataclass
class PairRecord:
    """One garment-lookbook pair.

    Image fields are references: a path relative to the manifest's folder (manifest form) or the
    sample key's extension (shard form). ``crop_box`` is ``(x1, y1, x2, y2)`` in lookbook pixels,
    ``keypoints`` are COCO-18 ``[x, y, confidence]`` rows in lookbook pixels (confidence 0 = missing).
    """

    pair_id: str
    garment_id: str
    lookbook_id: str
    garment_image: str
    lookbook_image: str
    category: str = ""
    tier: str = "high"
    confidence: float = 1.0
    scores: dict[str, float] = field(default_factory=dict)
    rank: int = 0
    crop_box: tuple[float, float, float, float] | None = None
    keypoints: list[list[float]] | None = None
    split: str = "train"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise DataError(f"pair {self.pair_id!r}: tier {self.tier!r} is not one of {TIERS}")
        if not 0.0 <= float(self.confidence) <= 1.0:
            raise DataError(f"pair {self.pair_id!r}: confidence {self.confidence} is outside [0, 1]")
        if self.crop_box is not None:
            if len(self.crop_box) != 4:
                raise DataError(f"pair {self.pair_id!r}: crop_box must be (x1, y1, x2, y2), got {self.crop_box}")
            self.crop_box = tuple(float(v) for v in self.crop_box)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.crop_box is not None:
            out["crop_box"] = list(self.crop_box)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "<record>") -> PairRecord:
        """Build a record from a dict, naming ``where`` (file:line) if keys are missing or unknown."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise DataError(f"{where}: unknown pair-record key(s) {sorted(unknown)}; expected a subset of {sorted(known)}")
        required = ("pair_id", "garment_id", "lookbook_id", "garment_image", "lookbook_image")
        missing = [k for k in required if k not in data]
        if missing:
            raise DataError(f"{where}: pair record is missing required key(s) {missing}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise DataError(f"{where}: malformed pair record ({exc})") from exc
