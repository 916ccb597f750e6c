"""Pair manifests: read/write, selection by tier and confidence, weighting, and a map-style dataset.

A manifest is the small, random-access form of a pair set: one :class:`PairRecord` per JSONL line or
Parquet row, with image paths relative to the manifest's folder. It is what retrieval writes, what
humans inspect, and what :mod:`fashionshoot.data.shards` packs into WebDataset shards for streaming.
Selection and sample building live here so the manifest dataset and the shard stream filter and
shape samples identically. The format is described in docs/pair-format.md.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, WeightedRandomSampler

from fashionshoot.data.images import load_image
from fashionshoot.data.records import TIERS, PairRecord, tiers_at_least
from fashionshoot.errors import DataError

MANIFEST_SUFFIXES: tuple[str, ...] = (".jsonl", ".parquet")


# --------------------------------------------------------------------------------------------------
# Validation beyond the record's own constructor
# --------------------------------------------------------------------------------------------------


def check_keypoints(record: PairRecord, where: str) -> None:
    """Raise :class:`DataError` unless ``record.keypoints`` is absent or a list of finite ``[x, y, c]`` rows.

    Keypoints arrive as JSON from pose estimators and public sets; a ragged or non-numeric row would
    otherwise surface much later as a shape error inside a pose adapter, far from the bad file.
    """
    if record.keypoints is None:
        return
    if not isinstance(record.keypoints, list):
        raise DataError(f"{where}: pair {record.pair_id!r}: keypoints must be a list of [x, y, c] rows")
    for i, row in enumerate(record.keypoints):
        ok = (
            isinstance(row, list)
            and len(row) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in row)
        )
        if not ok:
            raise DataError(
                f"{where}: pair {record.pair_id!r}: keypoint row {i} is {row!r}, expected [x, y, c]"
            )


def parse_record(data: Any, where: str) -> PairRecord:
    """Build and validate one record from decoded JSON; every problem is a :class:`DataError` naming ``where``."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
    record = PairRecord.from_dict(data, where)
    check_keypoints(record, where)
    return record


def check_record(record: PairRecord, where: str) -> None:
    """The checks :func:`parse_record` applies on reading, for writers: what they write must read back.

    Without them a manifest or shard accepts, say, NaN keypoints and the pair is lost only later, when
    the reader rejects (manifest) or skips (shard stream) it. ``where`` names the file being written.
    """
    try:
        record.validate()  # again: a record is mutable after construction
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    check_keypoints(record, where)


# --------------------------------------------------------------------------------------------------
# Manifests (JSONL / Parquet)
# --------------------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in MANIFEST_SUFFIXES:
        raise DataError(f"{path}: unsupported manifest type {suffix!r}; expected one of {MANIFEST_SUFFIXES}")
    return suffix


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (registers the submodule)
    except ImportError as exc:
        raise DataError(
            "Parquet manifests need pyarrow: pip install 'fashionshoot[parquet]' (or use a .jsonl manifest)"
        ) from exc
    return pyarrow


def _parquet_schema(pa: Any) -> Any:
    """Typed columns so empty or all-null columns round-trip; free-form metadata is stored as JSON text."""
    return pa.schema(
        [
            ("pair_id", pa.string()),
            ("garment_id", pa.string()),
            ("lookbook_id", pa.string()),
            ("garment_image", pa.string()),
            ("lookbook_image", pa.string()),
            ("category", pa.string()),
            ("tier", pa.string()),
            ("confidence", pa.float64()),
            ("scores", pa.map_(pa.string(), pa.float64())),
            ("rank", pa.int64()),
            ("crop_box", pa.list_(pa.float64())),
            ("keypoints", pa.list_(pa.list_(pa.float64()))),
            ("split", pa.string()),
            ("metadata", pa.string()),
        ]
    )


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary sibling and rename, so a crash never leaves a half-written manifest."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_manifest(records: Iterable[PairRecord], path: str | Path) -> Path:
    """Write ``records`` to a ``.jsonl`` or ``.parquet`` manifest (chosen by suffix); returns the path."""
    path = Path(path)
    suffix = _suffix(path)
    records = list(records)
    for record in records:
        check_record(record, str(path))
    rows = [r.to_dict() for r in records]
    if suffix == ".jsonl":

        def write(tmp: Path) -> None:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")

    else:
        pa = _pyarrow()
        for row in rows:
            row["metadata"] = json.dumps(row["metadata"], ensure_ascii=False)
        table = pa.Table.from_pylist(rows, schema=_parquet_schema(pa))

        def write(tmp: Path) -> None:
            pa.parquet.write_table(table, tmp)

    _atomic_write(path, write)
    return path


def _read_jsonl(path: Path) -> list[PairRecord]:
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: malformed JSON ({exc})") from exc
            records.append(parse_record(data, where))
    return records


def _read_parquet(path: Path) -> list[PairRecord]:
    pa = _pyarrow()
    try:
        rows = pa.parquet.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read Parquet manifest ({exc})") from exc
    records = []
    for i, row in enumerate(rows):
        where = f"{path}:row {i}"
        if isinstance(row.get("scores"), list):  # Arrow maps come back as (key, value) pairs
            row["scores"] = dict(row["scores"])
        if row.get("scores") is None:
            row["scores"] = {}
        try:
            row["metadata"] = json.loads(row["metadata"]) if row.get("metadata") else {}
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: malformed metadata JSON ({exc})") from exc
        records.append(parse_record(row, where))
    return records


def read_manifest(path: str | Path) -> list[PairRecord]:
    """Read a ``.jsonl`` or ``.parquet`` manifest; a bad line or row is a :class:`DataError` naming file:line."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise DataError(f"{path}: manifest not found")
    return _read_jsonl(path) if suffix == ".jsonl" else _read_parquet(path)


# --------------------------------------------------------------------------------------------------
# Selection and weighting
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFilter:
    """Which pairs a reader keeps. Shared by :func:`select_pairs`, the manifest dataset and the shard stream.

    ``tiers`` and ``categories`` are each one name or several. With ``nested=True`` (the default) a tier also admits every
    better tier, so ``"medium"`` means high + medium: training on "medium and up" is the common case
    and never silently drops the best pairs. With ``nested=False`` exactly the named tiers are kept.
    """

    tiers: str | Sequence[str] | None = None
    nested: bool = True
    min_confidence: float | None = None
    split: str | None = None
    categories: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.allowed_tiers  # noqa: B018  (validate tier names at construction, not mid-epoch)

    @cached_property
    def allowed_tiers(self) -> frozenset[str]:
        """The set of tiers this filter admits (all tiers when ``tiers`` is None)."""
        if self.tiers is None:
            return frozenset(TIERS)
        named = [self.tiers] if isinstance(self.tiers, str) else list(self.tiers)
        for tier in named:
            tiers_at_least(tier)  # validates the name
        if self.nested:
            return frozenset(t for tier in named for t in tiers_at_least(tier))
        return frozenset(named)

    @cached_property
    def allowed_categories(self) -> frozenset[str] | None:
        """The categories this filter admits, or None for all. A single name is wrapped, not iterated:
        ``"dress"`` as a sequence would be its letters, and ``in`` a substring test."""
        if self.categories is None:
            return None
        return frozenset([self.categories] if isinstance(self.categories, str) else self.categories)

    def accepts(self, record: PairRecord) -> bool:
        if record.tier not in self.allowed_tiers:
            return False
        if self.min_confidence is not None and record.confidence < self.min_confidence:
            return False
        if self.split is not None and record.split != self.split:
            return False
        return self.allowed_categories is None or record.category in self.allowed_categories


def select_pairs(
    records: Iterable[PairRecord],
    tiers: str | Sequence[str] | None = None,
    *,
    nested: bool = True,
    min_confidence: float | None = None,
    split: str | None = None,
    categories: str | Sequence[str] | None = None,
) -> list[PairRecord]:
    """Records passing a :class:`PairFilter` built from the arguments, in their original order."""
    keep = PairFilter(tiers, nested, min_confidence, split, categories)
    return [r for r in records if keep.accepts(r)]


def confidence_weight(record: PairRecord, power: float = 1.0) -> float:
    """``confidence ** power``: ``power`` > 1 sharpens towards confident pairs, 0 makes all weights equal."""
    return float(record.confidence) ** power


def confidence_weights(records: Sequence[PairRecord], power: float = 1.0) -> list[float]:
    """Per-record sampling or loss weights from the fused confidence (see :func:`confidence_weight`)."""
    return [confidence_weight(r, power) for r in records]


def weighted_sampler(
    records: Sequence[PairRecord],
    power: float = 1.0,
    num_samples: int | None = None,
    replacement: bool = True,
    generator: torch.Generator | None = None,
) -> WeightedRandomSampler:
    """A sampler that draws records in proportion to their confidence weight (single-process loaders).

    For multi-process training use the per-sample ``weight`` as a loss weight instead: this sampler
    draws from the whole set on every rank, so ranks would not see disjoint data.
    """
    weights = confidence_weights(records, power)
    if not weights or sum(weights) <= 0:
        raise DataError("weighted_sampler: no record has a positive confidence weight")
    return WeightedRandomSampler(
        weights, num_samples or len(weights), replacement=replacement, generator=generator
    )


# --------------------------------------------------------------------------------------------------
# Samples
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """How decoded images become a training sample, shared by the manifest dataset and the shard stream.

    ``size`` is ``(width, height)`` in PIL order; ``transform`` (e.g. a torchvision pipeline) runs after
    the resize. Samples are dicts ``{"garment", "lookbook", "record", "weight"}``.
    """

    size: tuple[int, int] | None = None
    resample: Image.Resampling = Image.Resampling.BICUBIC
    transform: Callable[[Image.Image], Any] | None = None
    weight_power: float = 1.0

    def image(self, img: Image.Image) -> Any:
        if self.size is not None and img.size != tuple(self.size):
            img = img.resize(tuple(self.size), self.resample)
        return self.transform(img) if self.transform is not None else img

    def sample(self, record: PairRecord, garment: Image.Image, lookbook: Image.Image) -> dict[str, Any]:
        return {
            "garment": self.image(garment),
            "lookbook": self.image(lookbook),
            "record": record,
            "weight": confidence_weight(record, self.weight_power),
        }


def collate_pairs(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stacks tensor images and weights, keeps records (and PIL images) as lists."""

    def images(key: str) -> Any:
        items = [s[key] for s in batch]
        return torch.stack(items) if all(isinstance(x, torch.Tensor) for x in items) else items

    return {
        "garment": images("garment"),
        "lookbook": images("lookbook"),
        "record": [s["record"] for s in batch],
        "weight": torch.tensor([s["weight"] for s in batch], dtype=torch.float32),
    }


class PairManifestDataset(Dataset):
    """Map-style dataset over manifest records; images are read relative to ``root``.

    A direct loader: a missing or corrupt image raises :class:`DataError` naming the file, because a
    random-access read of a named sample has no sensible way to "skip" it. Use the shard stream for
    long runs that must survive bad files.
    """

    def __init__(
        self, records: Sequence[PairRecord], root: str | Path, spec: SampleSpec | None = None
    ) -> None:
        self.records = list(records)
        self.root = Path(root)
        self.spec = spec or SampleSpec()

    @classmethod
    def from_manifest(
        cls, path: str | Path, select: PairFilter | None = None, spec: SampleSpec | None = None
    ) -> PairManifestDataset:
        """Read ``path``, keep the records ``select`` accepts, and resolve images next to the manifest."""
        path = Path(path)
        records = read_manifest(path)
        if select is not None:
            records = [r for r in records if select.accepts(r)]
        return cls(records, path.parent, spec)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        garment = load_image(self.root / record.garment_image)
        lookbook = load_image(self.root / record.lookbook_image)
        return self.spec.sample(record, garment, lookbook)

    def weights(self, power: float | None = None) -> list[float]:
        """Confidence weights aligned with indices (``power`` defaults to the spec's ``weight_power``)."""
        return confidence_weights(self.records, self.spec.weight_power if power is None else power)
