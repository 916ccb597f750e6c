"""Run a protocol's metrics over a stream of batches, per category and over the union of categories.

Why: papers report per-category numbers (Dress Code dresses / upper / lower) and "all", and disagree
on how "all" is aggregated. Here each category gets its own metric objects and the aggregate is the
same metric over the union of samples (torchmetrics ``merge_state``: summed FID statistics,
concatenated KID features, summed per-image scores) — never an average of category numbers.
Extractors are loaded once and shared by all categories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.metrics.base import ProtocolMixin
from fashionshoot.metrics.clip import ClipBackend, CLIPImageScore, CLIPTextScore
from fashionshoot.metrics.distribution import FID, KID
from fashionshoot.metrics.fidelity import GarmentRetrievalRecall
from fashionshoot.metrics.paired import LPIPS, PSNR, SSIM
from fashionshoot.metrics.protocol import ALL_METRICS, DISTRIBUTION_METRICS, PAIRED_METRICS, Protocol, Setting
from fashionshoot.metrics.report import AGGREGATE, EvaluationReport

#: The extractor each metric needs (None: no network).
_NEEDS = {"fid": "inception", "kid": "inception", "lpips": "lpips", "clip_t": "clip", "clip_i": "clip",
          "garment_recall": "garment_gallery"}


@dataclass
class GarmentGallery:
    """Catalogue garments already embedded by ``encoder`` (see :class:`GarmentRetrievalRecall`)."""

    encoder: Callable[[Tensor], Tensor]
    embeddings: Tensor
    ids: Sequence[str]


@dataclass
class Extractors:
    """The loaded networks a suite shares across categories; only those its metrics need must be set."""

    inception: nn.Module | None = None
    lpips: nn.Module | None = None
    clip: ClipBackend | None = None
    garment_gallery: GarmentGallery | None = None


@dataclass
class EvaluationSuite:
    """Metrics of one protocol and setting, fed with :meth:`update_real` and :meth:`update_generated`."""

    protocol: Protocol
    metrics: Sequence[str]
    setting: Setting
    extractors: Extractors
    skipped: dict[str, str] = field(default_factory=dict)
    _by_category: dict[str, dict[str, Metric]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise ConfigError(f"unknown metric(s) {unknown}; known: {', '.join(ALL_METRICS)}")
        active = []
        for name in dict.fromkeys(self.metrics):
            if name in PAIRED_METRICS and self.setting == "unpaired":
                self.skipped[name] = "paired-only metric; the setting is unpaired"
                continue
            need = _NEEDS.get(name)
            if need and getattr(self.extractors, need) is None:
                raise ConfigError(f"metric {name!r} needs a {need.replace('_', ' ')} (extractors.{need} is unset)")
            active.append(name)
        self.metrics = active

    def _make(self, name: str) -> Metric:
        p, s, x = self.protocol, self.setting, self.extractors
        if name == "fid":
            return FID(x.inception, p, s)
        if name == "kid":
            return KID(x.inception, p, s)
        if name == "lpips":
            return LPIPS(x.lpips, p, s)
        if name in ("ssim", "psnr"):
            return (SSIM if name == "ssim" else PSNR)(p, s)
        if name in ("clip_t", "clip_i"):
            return (CLIPTextScore if name == "clip_t" else CLIPImageScore)(x.clip, p, s)
        gallery = x.garment_gallery
        return GarmentRetrievalRecall(gallery.encoder, gallery.embeddings, gallery.ids, p, s)

    def _metrics_for(self, category: str) -> dict[str, Metric]:
        if category not in self._by_category:
            self._by_category[category] = {name: self._make(name) for name in self.metrics}
        return self._by_category[category]

    @staticmethod
    def _groups(categories: Sequence[str] | None, n: int) -> dict[str, list[int]]:
        if categories is None:
            return {AGGREGATE: list(range(n))}
        if len(categories) != n:
            raise ValueError(f"{len(categories)} categories for {n} images")
        if AGGREGATE in categories:  # it would merge into, and be reported as, the pooled result
            raise DataError(f"category {AGGREGATE!r} is reserved for the pooled result; rename the category")
        groups: dict[str, list[int]] = {}
        for i, c in enumerate(categories):
            groups.setdefault(c, []).append(i)
        return groups

    def _update_distribution(self, metrics: dict[str, Metric], images: list[Tensor], real: bool) -> None:
        """Extract Inception features once and feed them to both FID and KID."""
        users = [m for name, m in metrics.items() if name in DISTRIBUTION_METRICS]
        if users:
            features = users[0].extract(images)
            for metric in users:
                metric.update_features(features, real)

    def update_real(self, images: Sequence[Tensor], categories: Sequence[str] | None = None) -> None:
        """Reference images of the real distribution (FID/KID), as (3, H, W) tensors of any size."""
        for category, idx in self._groups(categories, len(images)).items():
            self._update_distribution(self._metrics_for(category), [images[i] for i in idx], real=True)

    def update_generated(
        self,
        images: Sequence[Tensor],
        categories: Sequence[str] | None = None,
        references: Sequence[Tensor] | None = None,
        captions: Sequence[str] | None = None,
        garments: Sequence[Tensor] | None = None,
        garment_ids: Sequence[str] | None = None,
    ) -> None:
        """Generated images plus what each metric compares them with (paired references, captions, garments)."""
        inputs = {"references": references, "captions": captions, "garments": garments, "garment_ids": garment_ids}
        wanted = {"lpips": "references", "ssim": "references", "psnr": "references", "clip_t": "captions",
                  "clip_i": "garments", "garment_recall": "garment_ids"}
        for name in self.metrics:
            if name in wanted and inputs[wanted[name]] is None:
                raise DataError(f"metric {name!r} needs {wanted[name]} for every generated image")
        for category, idx in self._groups(categories, len(images)).items():
            gen = [images[i] for i in idx]
            metrics = self._metrics_for(category)
            self._update_distribution(metrics, gen, real=False)
            for name, metric in metrics.items():
                if name in DISTRIBUTION_METRICS:
                    continue
                if name in PAIRED_METRICS:
                    _update_paired(metric, gen, [references[i] for i in idx])
                elif name == "clip_t":
                    metric.update(gen, [captions[i] for i in idx])
                elif name == "clip_i":
                    metric.update(gen, [garments[i] for i in idx])
                else:
                    metric.update(gen, [garment_ids[i] for i in idx])

    def _aggregate(self, name: str) -> Metric:
        parts = [metrics[name] for metrics in self._by_category.values()]
        if len(parts) == 1:
            return parts[0]
        merged = self._make(name)
        for part in parts:
            merged.merge_state(part)
        return merged

    def compute(self, skip_failed: bool = False) -> EvaluationReport:
        """Every metric per category and aggregated; with ``skip_failed`` a metric that cannot be computed
        for a category (e.g. too few images for KID) is recorded in ``skipped_metrics`` instead of raising."""
        report = EvaluationReport(protocol=self.protocol.to_dict(), setting=self.setting,
                                  skipped_metrics=dict(self.skipped))
        categories = [c for c in self._by_category if c != AGGREGATE]
        jobs: list[tuple[str, str, Callable[[], ProtocolMixin]]] = []
        for name in self.metrics:
            if len(categories) > 1:
                jobs += [(c, name, lambda c=c, n=name: self._by_category[c][n]) for c in categories]
            jobs.append((AGGREGATE, name, lambda n=name: self._aggregate(n)))
        for category, name, get in jobs:
            metric = get()
            try:
                report.results.extend(metric.results(category))
            except (DataError, RuntimeError, ValueError) as exc:
                if not skip_failed:
                    raise DataError(f"{name} ({category}): {exc}") from exc
                report.skipped_metrics[f"{name}/{category}"] = str(exc)
        return report


def _update_paired(metric: Metric, preds: list[Tensor], refs: list[Tensor]) -> None:
    """Feed equal-shape runs as one batch (shapes may vary along a stream of images)."""
    start = 0
    while start < len(preds):
        end = start + 1
        while end < len(preds) and preds[end].shape == preds[start].shape and refs[end].shape == refs[start].shape:
            end += 1
        metric.update(torch.stack(preds[start:end]), torch.stack(refs[start:end]))
        start = end
