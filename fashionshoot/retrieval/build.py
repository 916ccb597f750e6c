"""Garments x lookbooks -> scored pairs -> quality tiers -> manifest and WebDataset shards.

The pipeline (see docs/retrieval-pipeline.md)::

    read catalogues ─ categorise ─ detect per category ─ views (crops + full image)
          └─ embed garments and views with every member (cached) ─ restrict candidates (category,
             fuzzy brand/title) ─ member scores per view ─ fuse ─ pool views per lookbook ─ top-k
             ─ calibrate confidence ─ tiers ─ manifest + shards

It is **resumable**: embeddings, categories and detections are cached per item (keyed by file
fingerprint) and garments are scored in chunks whose results are written atomically under
``work_dir``; re-running skips everything already done, and changed inputs invalidate only what they
touch. It is **parallel**: under ``accelerate launch`` every process detects and embeds its share of
lookbooks and scores its share of garment chunks; rank 0 merges. Bad inputs never yield a silent
pair: unreadable images and garments without candidates are skipped and counted, detector misses fall
back to the full image and are counted, and embedding-dimension mismatches are errors.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from PIL import Image
from tqdm.auto import tqdm

from fashionshoot.config import save_config, to_dict
from fashionshoot.data.faults import FaultReport
from fashionshoot.data.images import load_image
from fashionshoot.data.pairs import write_manifest
from fashionshoot.data.records import TIERS, PairRecord
from fashionshoot.data.shards import write_pair_shards
from fashionshoot.data.synthetic.vocab import CATEGORIES as SYNTHETIC_CATEGORIES
from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.cache import (
    CacheItem,
    EmbeddingCache,
    FingerprintMode,
    RecordCache,
    file_fingerprint,
    text_fingerprint,
)
from fashionshoot.retrieval.categorize import (
    CatalogueItem,
    Categorizer,
    FuzzyMatcher,
    ZeroShotCategorizer,
    predict,
    read_catalogue,
)
from fashionshoot.retrieval.detect import (
    Box,
    Detection,
    Detector,
    Pooling,
    crop,
    full_box,
    pool_views,
    view_boxes,
)
from fashionshoot.retrieval.encoders import Encoder
from fashionshoot.retrieval.fusion import FusionMethod, fuse_scores
from fashionshoot.retrieval.members import MemberConfig, build_members, similarity

#: The synthetic set's taxonomy is the default: a coarse one that most catalogues map onto.
DEFAULT_CATEGORIES: tuple[str, ...] = SYNTHETIC_CATEGORIES


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class DetectConfig:
    """Open-vocabulary detector (``backend: none`` scores full images only)."""

    backend: Literal["none", "transformers"] = "none"
    path: str = "google/owlv2-base-patch16-ensemble"
    prompt: str = "a photo of a {}"
    threshold: float = 0.1
    text_threshold: float = 0.25
    nms_iou: float = 0.5
    max_crops: int = 3
    padding: float = 0.05
    min_side: float = 8.0
    batch_size: int = 8


@dataclass
class CategorizeConfig:
    """Category assignment: metadata first, else zero-shot with the text tower of ``member``.

    ``lookbook_top_k`` > 0 restricts a lookbook without category metadata to its ``k`` most likely
    categories; 0 lets every lookbook be a candidate for every category (the detector decides).
    """

    use_metadata: bool = True
    member: str = ""
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}.", "a product photo of a {}."])
    lookbook_top_k: int = 0


@dataclass
class MatchConfig:
    """Fuzzy metadata restriction: field -> minimum rapidfuzz score (empty: no restriction)."""

    fields: dict[str, float] = field(default_factory=lambda: {"brand": 85.0})
    scorer: str = "token_set_ratio"


@dataclass
class ConfidenceConfig:
    """How a pair's signal becomes a confidence in [0, 1].

    ``signal``: the pair's fused score, or its margin over the garment's next-best lookbook.
    ``method``: ``minmax`` maps the run's lowest signal to 0 and highest to 1 (relative to this run);
    ``sigmoid`` is ``1 / (1 + exp(-(signal - center) / scale))`` (absolute, comparable across runs).
    """

    signal: Literal["fused", "margin"] = "fused"
    method: Literal["minmax", "sigmoid"] = "minmax"
    center: float = 0.0
    scale: float = 1.0


@dataclass
class TierConfig:
    """Quality tiers, ranked by confidence.

    ``top_n``: ``sizes`` are pair counts. ``nested: true`` reads them as cumulative (high = best 10k,
    medium = best 50k including high, so 40k records get tier medium); ``nested: false`` as disjoint
    (the next 50k after high are medium). ``threshold``: a pair gets the best tier whose minimum
    confidence it reaches (``nested`` does not apply). Pairs below every tier are dropped.
    """

    mode: Literal["top_n", "threshold"] = "top_n"
    sizes: dict[str, int] = field(default_factory=lambda: {"high": 10000, "medium": 50000, "low": 300000})
    thresholds: dict[str, float] = field(default_factory=lambda: {"high": 0.9, "medium": 0.7, "low": 0.5})
    nested: bool = True


@dataclass
class BuildConfig:
    """Everything ``fashionshoot build-pairs`` does. Metadata paths default to ``<folder>.jsonl``."""

    garments: str = ""
    garments_metadata: str = ""
    lookbooks: str = ""
    lookbooks_metadata: str = ""
    out_dir: str = "runs/build_pairs"
    work_dir: str = ""
    categories: list[str] = field(default_factory=lambda: list(DEFAULT_CATEGORIES))
    members: list[MemberConfig] = field(default_factory=lambda: [
        MemberConfig(name="siglip2", backend="siglip2", path="google/siglip2-base-patch16-224")])
    fusion: FusionMethod = "zscore"
    detect: DetectConfig = field(default_factory=DetectConfig)
    categorize: CategorizeConfig = field(default_factory=CategorizeConfig)
    match: MatchConfig = field(default_factory=MatchConfig)
    pooling: Pooling = "max"
    pairs_per_garment: int = 1
    min_fused: float | None = None
    confidence: ConfidenceConfig = field(default_factory=ConfidenceConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    fingerprint: FingerprintMode = "content"
    batch_size: int = 32
    garment_chunk: int = 512
    shards: bool = True
    samples_per_shard: int = 1000
    progress: bool = True
    device: str = ""

    def __post_init__(self) -> None:
        if self.pairs_per_garment < 1 or self.garment_chunk < 1 or self.batch_size < 1:
            raise ConfigError("pairs_per_garment, garment_chunk and batch_size must be >= 1")
        if not self.categories or len(set(self.categories)) != len(self.categories):
            raise ConfigError(f"categories must be distinct and non-empty, got {self.categories}")
        bad = set(self.tiers.sizes) | set(self.tiers.thresholds)
        if bad - set(TIERS):
            raise ConfigError(f"tiers: unknown tier name(s) {sorted(bad - set(TIERS))}; expected {TIERS}")


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


class ProcessState(Protocol):
    """What the builder needs from ``accelerate.PartialState``: rank, world size and a barrier."""

    process_index: int
    num_processes: int

    def wait_for_everyone(self) -> None: ...


def build_detector(config: DetectConfig, device: str) -> Detector | None:
    if config.backend == "none":
        return None
    from fashionshoot.retrieval.detect import TransformersDetector

    return TransformersDetector(config.path, threshold=config.threshold, text_threshold=config.text_threshold,
                                nms_iou=config.nms_iou, device=device, batch_size=config.batch_size)


# --------------------------------------------------------------------------------------------------
# Tiers and confidence (pure functions, reused by tests and by re-tiering a finished run)
# --------------------------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    """Logistic function that never overflows: ``math.exp`` only ever sees a non-positive argument
    (a sharp scale turns a far-below-centre signal into ``exp(700+)``, an OverflowError)."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def calibrate(signal: Sequence[float], config: ConfidenceConfig) -> list[float]:
    """Map raw pair signals to confidences in [0, 1] (see :class:`ConfidenceConfig`)."""
    if config.method == "sigmoid":
        if config.scale <= 0:
            raise ConfigError("confidence.scale must be > 0")
        return [_sigmoid((s - config.center) / config.scale) for s in signal]
    if not signal:
        return []
    low, high = min(signal), max(signal)
    if high - low <= 1e-12:
        return [1.0] * len(signal)
    return [(s - low) / (high - low) for s in signal]


def assign_tiers(confidence: Sequence[float], config: TierConfig) -> list[str | None]:
    """The tier of each pair (None: below every tier). Ties in ``top_n`` keep input order."""
    tiers = [t for t in TIERS if t in (config.sizes if config.mode == "top_n" else config.thresholds)]
    if config.mode == "threshold":
        minimums = [config.thresholds[t] for t in tiers]
        if minimums != sorted(minimums, reverse=True):
            raise ConfigError(f"tiers.thresholds must decrease from high to low, got {config.thresholds}")
        return [next((t for t in tiers if c >= config.thresholds[t]), None) for c in confidence]
    sizes = [config.sizes[t] for t in tiers]
    if any(s < 0 for s in sizes):
        raise ConfigError(f"tiers.sizes must be >= 0, got {config.sizes}")
    if config.nested:
        if sizes != sorted(sizes):
            raise ConfigError(f"nested tiers.sizes are cumulative and must grow from high to low, got {config.sizes}")
        bounds = sizes
    else:
        bounds = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    order = sorted(range(len(confidence)), key=lambda i: -confidence[i])
    out: list[str | None] = [None] * len(confidence)
    for position, i in enumerate(order):
        out[i] = next((t for t, b in zip(tiers, bounds, strict=True) if position < b), None)
    return out


# --------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------


@dataclass
class LookbookViews:
    """One readable lookbook: its fingerprint, candidate categories and view boxes per category."""

    item: CatalogueItem
    fingerprint: str
    size: tuple[int, int]
    views: dict[str, list[Box]]


@dataclass
class BuildResult:
    """What a finished build wrote and counted (rank 0 only)."""

    records: list[PairRecord]
    manifest: Path
    report: dict[str, Any]
    faults: FaultReport


def _view_key(item_id: str, box: Box) -> str:
    return f"{item_id}@{','.join(f'{v:.1f}' for v in box)}"


def _safe_id(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in text)[:60]


class PairBuilder:
    """Runs :class:`BuildConfig` with given components (``members`` etc. default to the config's).

    Components are injectable so a caller (or a test) can use any :class:`Encoder`,
    :class:`~fashionshoot.retrieval.detect.Detector` or :class:`Categorizer`; ``state`` is
    ``accelerate.PartialState()`` by default.
    """

    def __init__(self, config: BuildConfig, members: Mapping[str, Encoder] | None = None,
                 detector: Detector | None = None, categorizer: Categorizer | None = None,
                 state: ProcessState | None = None) -> None:
        if not config.garments or not config.lookbooks:
            raise ConfigError("build-pairs needs garments=<folder> and lookbooks=<folder>")
        if state is None:
            from accelerate import PartialState

            state = PartialState()
        self.config, self.state = config, state
        device = config.device or str(getattr(state, "device", "cpu"))
        self.members = dict(members) if members is not None else build_members(config.members, device, config.batch_size)
        if not self.members:
            raise ConfigError("build-pairs needs at least one member")
        self.weights = {m.name: m.weight for m in config.members if m.name in self.members} or None
        self.detector = detector if detector is not None else build_detector(config.detect, device)
        self._categorizer = categorizer
        # Injected components are not described by the config, so their names key the chunk results.
        self._injected = (categorizer.name if categorizer is not None else "",
                          detector.name if detector is not None else "")
        self.matcher = FuzzyMatcher(config.match.fields, config.match.scorer) if config.match.fields else None
        self.out_dir = Path(config.out_dir)
        self.work_dir = Path(config.work_dir) if config.work_dir else self.out_dir / "work"
        writer = f"r{state.process_index}"
        self.caches = {name: EmbeddingCache(self.work_dir / "embeddings", enc.name, writer)
                       for name, enc in self.members.items()}
        self.detections = RecordCache(self.work_dir / "detections", writer)
        self.category_cache = RecordCache(self.work_dir / "categories", writer)
        self.fallbacks: Counter = Counter()
        self._failed: set[str] = set()  # lookbooks that failed to decode during this pass

    # -- components created on first use ------------------------------------------------------------

    @property
    def categorizer(self) -> Categorizer:
        if self._categorizer is None:
            name = self.config.categorize.member or next(iter(self.members))
            if name not in self.members:
                raise ConfigError(f"categorize.member {name!r} is not one of {list(self.members)}")
            self._categorizer = ZeroShotCategorizer(self.members[name], self.config.categories,
                                                    templates=self.config.categorize.templates)
        return self._categorizer

    def _progress(self, total: int, desc: str) -> tqdm:
        main = self.state.process_index == 0
        return tqdm(total=total, desc=desc, disable=not (self.config.progress and main), leave=False)

    # -- shared per-item steps ------------------------------------------------------------------------

    def _fingerprints(self, items: Sequence[CatalogueItem], faults: FaultReport) -> dict[str, str]:
        out = {}
        for item in items:
            try:
                out[item.item_id] = file_fingerprint(item.path, self.config.fingerprint)
            except DataError as exc:
                faults.skip("unreadable file", str(exc))
        return out

    def _known_categories(self, item: CatalogueItem, faults: FaultReport) -> tuple[str, ...] | None:
        """Categories from metadata (unknown names are counted and dropped), or None if not given."""
        if not (self.config.categorize.use_metadata and item.categories):
            return None
        known = tuple(c for c in item.categories if c in self.config.categories)
        for c in item.categories:
            if c not in self.config.categories:
                faults.skip("category not in config", f"{item.path} ({c!r})")
        return known

    def _categorize(self, items: list[CatalogueItem], fps: Mapping[str, str], images: Mapping[str, Image.Image],
                    top_k: int) -> dict[str, tuple[str, ...]]:
        """Predicted categories (cached) for ``items`` whose images are in ``images`` when not cached."""
        if not items:
            return {}
        name = self.categorizer.name
        todo = [it for it in items if self.category_cache.get(it.item_id, f"{fps[it.item_id]}|{name}") is None]
        if todo:
            preds = predict(self.categorizer, [images[it.item_id] for it in todo], top_k=len(self.config.categories))
            self.category_cache.put_many((it.item_id, f"{fps[it.item_id]}|{name}", list(p))
                                         for it, p in zip(todo, preds, strict=True))
        return {it.item_id: tuple(self.category_cache.get(it.item_id, f"{fps[it.item_id]}|{name}")[:top_k])
                for it in items}

    def _load_images(self, items: Sequence[CatalogueItem], faults: FaultReport, reason: str) -> dict[str, Image.Image]:
        images = {}
        for item in items:
            try:
                images[item.item_id] = load_image(item.path)
            except DataError as exc:
                faults.skip(reason, str(exc))
        return images

    # -- lookbooks: categories, detections, views, embeddings -----------------------------------------

    def _detection_fp(self, fp: str) -> str:
        return f"{fp}|{self.detector.name}|{text_fingerprint(*self._queries())}" if self.detector else fp

    def _queries(self) -> list[str]:
        return [self.config.detect.prompt.format(c) for c in self.config.categories]

    def _lookbook_batch(self, items: list[CatalogueItem], faults: FaultReport) -> list[LookbookViews]:
        """Views of one batch of lookbooks; images are read only if something is not cached."""
        cfg = self.config
        fps = self._fingerprints(items, faults)
        items = [it for it in items if it.item_id in fps]
        known = {it.item_id: self._known_categories(it, faults) for it in items}
        top_k = cfg.categorize.lookbook_top_k
        need_cat = [it for it in items if known[it.item_id] is None and top_k > 0]
        cat_name = self.categorizer.name if need_cat else ""
        need = {it.item_id for it in need_cat
                if self.category_cache.get(it.item_id, f"{fps[it.item_id]}|{cat_name}") is None}
        if self.detector is not None:
            need |= {it.item_id for it in items if self.detections.get(it.item_id, self._detection_fp(fps[it.item_id])) is None}
        images = self._load_images([it for it in items if it.item_id in need], faults, "undecodable lookbook")
        items = [it for it in items if it.item_id not in need or it.item_id in images]
        self._detect([it for it in items if it.item_id in need], fps, images)
        readable = {it.item_id for it in items}
        predicted = self._categorize([it for it in need_cat if it.item_id in readable], fps, images, top_k)
        views = []
        for it in items:
            categories = known[it.item_id]
            if categories is None:
                categories = predicted.get(it.item_id, tuple(cfg.categories))
            if not categories:  # the categoriser found no clear winner: a candidate for every category
                self.fallbacks["uncategorised lookbook: all categories used"] += 1
                categories = tuple(cfg.categories)
            try:
                views.append(self._views(it, fps[it.item_id], categories))
            except DataError as exc:
                faults.skip("undecodable lookbook", str(exc))
        self._embed_views(views, images, faults)
        return [v for v in views if v.item.item_id not in self._failed]

    def _detect(self, items: list[CatalogueItem], fps: Mapping[str, str], images: Mapping[str, Image.Image]) -> None:
        if self.detector is None or not items:
            return
        queries = self._queries()
        found = self.detector.detect([images[it.item_id] for it in items], queries)
        self.detections.put_many(
            (it.item_id, self._detection_fp(fps[it.item_id]),
             [{"box": list(d.box), "score": d.score, "label": d.label} for d in dets])
            for it, dets in zip(items, found, strict=True))

    def _views(self, item: CatalogueItem, fp: str, categories: Sequence[str]) -> LookbookViews:
        size = _image_size(item.path)
        boxes: dict[str, list[Box]] = {}
        stored = self.detections.get(item.item_id, self._detection_fp(fp)) if self.detector else None
        for c in categories:
            if stored is None:
                boxes[c] = [full_box(size)]
                continue
            prompt = self.config.detect.prompt.format(c)
            dets = [Detection(tuple(d["box"]), d["score"], d["label"]) for d in stored if d["label"] == prompt]
            d = self.config.detect
            boxes[c] = view_boxes(dets, size, max_crops=d.max_crops, padding=d.padding, min_side=d.min_side)
            if len(boxes[c]) == 1:
                self.fallbacks["no detection: full image used"] += 1
        return LookbookViews(item, fp, size, boxes)

    def _embed_views(self, views: list[LookbookViews], images: dict[str, Image.Image], faults: FaultReport) -> None:
        """Fill every member's cache with the views' crops, reading a lookbook only if a crop is missing."""
        def loader(lv: LookbookViews, box: Box) -> Callable[[], Image.Image]:
            def load() -> Image.Image:
                key = lv.item.item_id
                if key in self._failed:
                    raise DataError(f"{lv.item.path}: unreadable (already counted)")
                if key not in images:
                    try:
                        images[key] = load_image(lv.item.path)
                    except DataError as exc:
                        self._failed.add(key)
                        faults.skip("undecodable lookbook", str(exc))
                        raise
                return crop(images[key], box)
            return load

        items = [CacheItem(_view_key(lv.item.item_id, box), text_fingerprint(lv.fingerprint, box), loader(lv, box))
                 for lv in views for box in dict.fromkeys(b for boxes in lv.views.values() for b in boxes)]
        for name, cache in self.caches.items():
            cache.fill(items, self.members[name].embed_images, FaultReport(), self.config.batch_size)

    def _lookbook_views(self, items: list[CatalogueItem], faults: FaultReport, desc: str) -> list[LookbookViews]:
        out: list[LookbookViews] = []
        bar = self._progress(len(items), desc)
        for start in range(0, len(items), self.config.batch_size):
            batch = items[start : start + self.config.batch_size]
            out.extend(self._lookbook_batch(batch, faults))
            bar.update(len(batch))
        bar.close()
        return out

    # -- garments: one chunk -> candidate pairs ---------------------------------------------------------

    def _score_chunk(self, garments: list[CatalogueItem], fps: Mapping[str, str], views: list[LookbookViews],
                     view_emb: dict[str, torch.Tensor], view_index: dict[str, dict[str, list[int]]],
                     view_boxes_flat: list[Box]) -> dict[str, Any]:
        """``fps``: the run's garment fingerprints (an unreadable garment has none and was counted once then)."""
        faults = FaultReport()
        garments = [g for g in garments if g.item_id in fps]
        known = {g.item_id: self._known_categories(g, faults) for g in garments}
        garments = [g for g in garments if known[g.item_id] != ()]
        need_cat = [g for g in garments if known[g.item_id] is None]
        cat_name = self.categorizer.name if need_cat else ""
        missing = {g.item_id for g in garments
                   if any((g.item_id, fps[g.item_id]) not in c for c in self.caches.values())}
        missing |= {g.item_id for g in need_cat
                    if self.category_cache.get(g.item_id, f"{fps[g.item_id]}|{cat_name}") is None}
        images = self._load_images([g for g in garments if g.item_id in missing], faults, "undecodable garment")
        garments = [g for g in garments if g.item_id not in missing or g.item_id in images]
        readable = {g.item_id for g in garments}
        predicted = self._categorize([g for g in need_cat if g.item_id in readable], fps, images, 1)
        for g in garments:
            if known[g.item_id] is None and not predicted[g.item_id]:
                faults.skip("uncategorised", f"{g.path} (the categoriser found no clear category)")
        garments = [g for g in garments if known[g.item_id] is not None or predicted[g.item_id]]
        category = {g.item_id: (known[g.item_id] or predicted[g.item_id])[0] for g in garments}
        keys = [(g.item_id, fps[g.item_id]) for g in garments]
        garment_emb = {}
        for name, cache in self.caches.items():
            cache.fill([CacheItem(k, fp, lambda k=k: images[k]) for k, fp in keys], self.members[name].embed_images,
                       faults, self.config.batch_size)
            garment_emb[name] = cache.get(keys)

        lookbook_meta = [lv.item.meta for lv in views]
        groups: dict[tuple[str, tuple[str, ...]], list[int]] = defaultdict(list)
        for i, g in enumerate(garments):
            groups[(category[g.item_id], self.matcher.key(g.meta) if self.matcher else ())].append(i)
        pairs = []
        for (cat, fuzzy_key), rows in groups.items():
            allowed = self.matcher.candidates([fuzzy_key], lookbook_meta)[0] if self.matcher else None
            candidates = [j for j in range(len(views)) if cat in views[j].views and (allowed is None or allowed[j])]
            if not candidates:
                for i in rows:
                    faults.skip("no candidate lookbooks", f"{garments[i].path} (category {cat!r})")
                continue
            pairs.extend(self._score_group([garments[i] for i in rows], cat, candidates, views,
                                           {n: e[rows] for n, e in garment_emb.items()}, view_emb,
                                           view_index, view_boxes_flat))
        return {"pairs": pairs, "faults": faults.to_dict()}

    def _score_group(self, garments: list[CatalogueItem], cat: str, candidates: list[int],
                     views: list[LookbookViews], garment_emb: dict[str, torch.Tensor],
                     view_emb: dict[str, torch.Tensor], view_index: dict[str, dict[str, list[int]]],
                     view_boxes_flat: list[Box]) -> list[dict[str, Any]]:
        cols: list[int] = []
        owner: list[int] = []
        for local, j in enumerate(candidates):
            idx = view_index[views[j].item.item_id][cat]
            cols.extend(idx)
            owner.extend([local] * len(idx))
        cols_t, owner_t = torch.tensor(cols), torch.tensor(owner)
        member_scores = {n: similarity(self.members[n], garment_emb[n], view_emb[n][cols_t]) for n in self.members}
        fused_views = fuse_scores(member_scores, self.config.fusion, self.weights)
        pooled, best_view = pool_views(fused_views, owner_t, len(candidates), self.config.pooling)
        member_pooled = {n: pool_views(s, owner_t, len(candidates), "mean")[0] for n, s in member_scores.items()} \
            if self.config.pooling == "mean" else None
        k = min(self.config.pairs_per_garment + 1, len(candidates))
        top_scores, top_idx = pooled.topk(k, dim=1)
        out = []
        for gi, garment in enumerate(garments):
            for r in range(min(self.config.pairs_per_garment, k)):
                fused = float(top_scores[gi, r])
                if self.config.min_fused is not None and fused < self.config.min_fused:
                    continue
                local = int(top_idx[gi, r])
                view = int(best_view[gi, local])
                scores = {n: float(member_pooled[n][gi, local] if member_pooled else s[gi, view])
                          for n, s in member_scores.items()}
                margin = fused - float(top_scores[gi, r + 1]) if r + 1 < k else None
                box = view_boxes_flat[cols[view]]
                lookbook = views[candidates[local]]
                out.append({"garment": garment.item_id, "lookbook": lookbook.item.item_id, "category": cat,
                            "rank": r + 1, "fused": fused, "margin": margin, "scores": scores,
                            "box": list(box), "full": box == full_box(lookbook.size)})
        return out

    # -- orchestration ----------------------------------------------------------------------------------

    def run(self) -> BuildResult | None:
        """Build (or resume) the pair set; returns the result on rank 0, None on other ranks."""
        cfg, state = self.config, self.state
        rank, world = state.process_index, state.num_processes
        garments = read_catalogue(cfg.garments, cfg.garments_metadata or None)
        lookbooks = read_catalogue(cfg.lookbooks, cfg.lookbooks_metadata or None)
        if not garments or not lookbooks:
            raise DataError(f"no images found (garments: {len(garments)} in {cfg.garments}, "
                            f"lookbooks: {len(lookbooks)} in {cfg.lookbooks})")

        # Phase 1: every rank detects and embeds its share of lookbooks (faults are counted in phase 2).
        self._lookbook_views(lookbooks[rank::world], FaultReport(), f"lookbooks [{rank}]")
        state.wait_for_everyone()
        for cache in (*self.caches.values(), self.detections, self.category_cache):
            cache.reload()
        self.fallbacks.clear()
        self._failed.clear()
        faults = FaultReport()
        views = self._lookbook_views(lookbooks, faults, "lookbook views")
        view_keys: list[tuple[str, str]] = []
        view_boxes_flat: list[Box] = []
        view_index: dict[str, dict[str, list[int]]] = {}
        for lv in views:
            positions: dict[Box, int] = {}
            for box in dict.fromkeys(b for boxes in lv.views.values() for b in boxes):
                positions[box] = len(view_keys)
                view_keys.append((_view_key(lv.item.item_id, box), text_fingerprint(lv.fingerprint, box)))
                view_boxes_flat.append(box)
            view_index[lv.item.item_id] = {c: [positions[b] for b in boxes] for c, boxes in lv.views.items()}
        if not views:
            raise DataError(f"no readable lookbook in {cfg.lookbooks}:\n{faults.summary()}")
        view_emb = {name: cache.get(view_keys) for name, cache in self.caches.items()}

        # Phase 2: garment chunks, round-robin over ranks, each result written once and atomically.
        signature = self._results_signature(view_keys, views)
        chunks = [garments[i : i + cfg.garment_chunk] for i in range(0, len(garments), cfg.garment_chunk)]
        results = self.work_dir / "results"
        results.mkdir(parents=True, exist_ok=True)
        garment_fps = self._fingerprints(garments, faults)  # once per run: chunk names and scoring share them
        names = [f"chunk-{i:06d}-{text_fingerprint(signature, *(self._garment_key(g, garment_fps) for g in chunk))}"
                 ".json" for i, chunk in enumerate(chunks)]
        bar = self._progress(len(chunks), "garment chunks")
        for i, (chunk, name) in enumerate(zip(chunks, names, strict=True)):
            if i % world == rank and not (results / name).is_file():
                body = self._score_chunk(chunk, garment_fps, views, view_emb, view_index, view_boxes_flat)
                tmp = results / f".{name}.tmp"
                tmp.write_text(json.dumps(body))
                os.replace(tmp, results / name)
            bar.update(1)
        bar.close()
        state.wait_for_everyone()
        if rank != 0:
            return None
        return self._merge([results / n for n in names], garments, lookbooks, faults)

    def _pairing_meta(self, item: CatalogueItem) -> str:
        """The metadata that decides which pairs an item can form: its categories and fuzzy-match fields."""
        return text_fingerprint(item.categories, self.matcher.key(item.meta) if self.matcher else ())

    def _garment_key(self, garment: CatalogueItem, fps: Mapping[str, str]) -> str:
        """A garment's part of its chunk name: a new image or new category/brand must re-score the chunk."""
        return text_fingerprint(garment.item_id, fps.get(garment.item_id, "unreadable"), self._pairing_meta(garment))

    def _results_signature(self, view_keys: list[tuple[str, str]], views: Sequence[LookbookViews]) -> str:
        """Chunk results stay valid while the settings that shape them and the views are unchanged;
        tiering, confidence and output settings are applied at merge time, so changing them re-uses
        every chunk. Injected components count by name (the config does not describe them), and each
        lookbook's pairing metadata and per-category views count because they decide the candidates."""
        cfg = to_dict(self.config)
        shaping = {k: cfg[k] for k in ("categories", "members", "fusion", "detect", "categorize", "match",
                                       "pooling", "pairs_per_garment", "min_fused", "fingerprint")}
        components = self._injected
        lookbooks = [(lv.item.item_id, self._pairing_meta(lv.item), sorted(lv.views.items())) for lv in views]
        return text_fingerprint(json.dumps(shaping, sort_keys=True), [m.name for m in self.members.values()],
                                components, lookbooks, *view_keys)

    def _merge(self, chunk_files: list[Path], garments: list[CatalogueItem], lookbooks: list[CatalogueItem],
               faults: FaultReport) -> BuildResult:
        cfg = self.config
        raw: list[dict[str, Any]] = []
        for path in chunk_files:
            body = json.loads(path.read_text())
            raw.extend(body["pairs"])
            chunk_faults = FaultReport()
            chunk_faults.counts.update(body["faults"]["counts"])
            chunk_faults.examples = body["faults"]["examples"]
            faults.merge(chunk_faults)
        signal = [p["fused"] if cfg.confidence.signal == "fused" else (p["margin"] or 0.0) for p in raw]
        confidence = calibrate(signal, cfg.confidence)
        order = sorted(range(len(raw)), key=lambda i: (-confidence[i], -raw[i]["fused"], raw[i]["garment"],
                                                       raw[i]["rank"]))
        raw, confidence = [raw[i] for i in order], [confidence[i] for i in order]
        tiers = assign_tiers(confidence, cfg.tiers)
        garment_by_id = {g.item_id: g for g in garments}
        lookbook_by_id = {lb.item_id: lb for lb in lookbooks}
        records = [self._record(p, c, t, garment_by_id[p["garment"]], lookbook_by_id[p["lookbook"]])
                   for p, c, t in zip(raw, confidence, tiers, strict=True) if t is not None]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = write_manifest(records, self.out_dir / "pairs.jsonl")
        if cfg.shards:
            write_pair_shards(records, self.out_dir, self.out_dir / "shards", cfg.samples_per_shard)
        report = {
            "garments": len(garments), "lookbooks": len(lookbooks), "candidate_pairs": len(raw),
            "pairs": len(records), "tiers": {t: sum(r.tier == t for r in records) for t in TIERS},
            "tiering": to_dict(cfg.tiers), "confidence": to_dict(cfg.confidence),
            "signal_range": [min(signal), max(signal)] if signal else None,
            "fallbacks": dict(self.fallbacks), "faults": faults.to_dict(),
            "members": sorted(self.members), "embedded": {n: c.embedded for n, c in self.caches.items()},
        }
        (self.out_dir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        save_config(cfg, self.out_dir)
        return BuildResult(records, manifest, report, faults)

    def _record(self, p: dict[str, Any], confidence: float, tier: str, garment: CatalogueItem,
                lookbook: CatalogueItem) -> PairRecord:
        rel = lambda path: os.path.relpath(path, self.out_dir)  # noqa: E731
        pair_key = text_fingerprint(p["garment"], p["lookbook"])[:10]
        return PairRecord(
            pair_id=f"{_safe_id(p['garment'])}--{_safe_id(p['lookbook'])}-{pair_key}",
            garment_id=p["garment"], lookbook_id=p["lookbook"],
            garment_image=rel(garment.path), lookbook_image=rel(lookbook.path),
            category=p["category"], tier=tier, confidence=min(max(confidence, 0.0), 1.0),
            scores={**p["scores"], "fused": p["fused"], **({"margin": p["margin"]} if p["margin"] is not None else {})},
            rank=p["rank"], crop_box=tuple(p["box"]), split=str(garment.meta.get("split", "train")),
            metadata={"view": "full" if p["full"] else "crop",
                      "garment": {k: garment.meta[k] for k in ("brand", "title") if k in garment.meta},
                      "lookbook": {k: lookbook.meta[k] for k in ("brand", "collection", "title") if k in lookbook.meta}},
        )


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height from the header only (no decode): view boxes need the frame, not the pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read image header ({exc})") from exc


def build_pairs(config: BuildConfig, **components: Any) -> BuildResult | None:
    """Convenience wrapper: ``PairBuilder(config, **components).run()``."""
    return PairBuilder(config, **components).run()
