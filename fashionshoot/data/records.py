"""The garment-lookbook pair record: one schema for synthetic, retrieved and public-set pairs.

A pair links one catalogue garment image to one lookbook (editorial / on-model) image that shows it.
Pairs mined by retrieval carry per-model scores, a fused confidence and a quality tier; ground-truth
pairs (synthetic set, Dress Code, VITON-HD) are tier ``high`` with confidence 1.0.
See docs/pair-format.md for the on-disk forms (JSONL / Parquet manifest, WebDataset shards).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from numbers import Integral, Real
from typing import Any

from fashionshoot.errors import DataError

#: Quality tiers, best first. "Nested" selection of tier t means every tier at least as good as t.
TIERS: tuple[str, ...] = ("high", "medium", "low")


#: The characters a ``pair_id`` may use to be a shard sample key (a regex class body): WebDataset splits a
#: member name at the first dot of its basename, so keys must not contain dots.
KEY_CHARS = "A-Za-z0-9_-"


def tiers_at_least(tier: str) -> tuple[str, ...]:
    """All tiers as good as or better than ``tier`` (nested selection): ``medium`` -> (high, medium)."""
    if tier not in TIERS:
        raise DataError(f"tier {tier!r}: expected one of {TIERS}")
    return TIERS[: TIERS.index(tier) + 1]


#: Fields that must be strings (JSON producers have sent ints and lists here).
_STR_FIELDS: tuple[str, ...] = (
    "pair_id", "garment_id", "lookbook_id", "garment_image", "lookbook_image", "category", "tier", "split",
)


def _is_number(value: Any, finite: bool = True) -> bool:
    """A real number (numpy scalars included), not a bool or a numeric string; finite unless told."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    return not finite or math.isfinite(value)


def _as_list(value: Any) -> list[Any] | None:
    """The items of a list, tuple or array; None for a scalar, a string or a mapping (not box-shaped)."""
    if isinstance(value, (str, bytes, dict)):
        return None
    try:
        return list(value)
    except TypeError:
        return None


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
        self.validate()

    def validate(self) -> None:
        """Raise :class:`DataError` naming the pair unless every field has its documented type and range.

        Records arrive as JSON from producers in other processes and languages: a ``"0.5"`` confidence
        or a ``NaN`` box would otherwise pass here and fail much later, mid-epoch, as a bare
        ``TypeError`` in a filter or a loss. Numbers are normalised (``confidence`` and ``crop_box`` to
        float, ``rank`` to int) so writers emit plain JSON. The writers call this again, since a record
        is mutable after construction.
        """
        for name in _STR_FIELDS:
            if not isinstance(getattr(self, name), str):
                raise DataError(f"pair {self.pair_id!r}: {name} must be a string, got {getattr(self, name)!r}")
        if self.tier not in TIERS:
            raise DataError(f"pair {self.pair_id!r}: tier {self.tier!r} is not one of {TIERS}")
        if not _is_number(self.confidence) or not 0.0 <= self.confidence <= 1.0:
            raise DataError(f"pair {self.pair_id!r}: confidence {self.confidence!r} is not a number in [0, 1]")
        self.confidence = float(self.confidence)
        if not isinstance(self.scores, dict) or not all(
            isinstance(k, str) and _is_number(v, finite=False) for k, v in self.scores.items()
        ):
            raise DataError(f"pair {self.pair_id!r}: scores must map model names to numbers, got {self.scores!r}")
        self.scores = {k: float(v) for k, v in self.scores.items()}
        if not isinstance(self.rank, Integral) or isinstance(self.rank, bool):
            raise DataError(f"pair {self.pair_id!r}: rank must be an integer, got {self.rank!r}")
        self.rank = int(self.rank)
        if self.crop_box is not None:
            box = _as_list(self.crop_box)
            if box is None or len(box) != 4 or not all(_is_number(v) for v in box):
                raise DataError(
                    f"pair {self.pair_id!r}: crop_box must be 4 finite numbers (x1, y1, x2, y2), got {self.crop_box!r}"
                )
            self.crop_box = tuple(float(v) for v in box)
        if not isinstance(self.metadata, dict):
            raise DataError(f"pair {self.pair_id!r}: metadata must be a JSON object, got {self.metadata!r}")

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
        except DataError as exc:  # a field check: already names the pair, add the location
            raise DataError(f"{where}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: malformed pair record ({exc})") from exc
