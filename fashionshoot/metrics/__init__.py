"""Evaluation metrics with a stated protocol: FID, KID, LPIPS, SSIM, PSNR, CLIP-T, CLIP-I, retrieval R@k,
and garment-fidelity R@k.

Every image metric is a torchmetrics ``Metric`` (update / compute / reset, DDP-safe) whose
``result()`` carries the :class:`Protocol` that defines its value; see docs/evaluation.md.

Names are resolved lazily (PEP 562): ``import fashionshoot.metrics`` stays light, and torchmetrics —
which itself imports transformers whenever it is installed — loads only when a metric class is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "clip": ("ClipBackend", "CLIPImageScore", "CLIPTextScore", "HFClip", "OpenClip", "load_clip"),
    "distribution": ("FID", "KID", "kid_from_features", "kid_subset_size"),
    "extractors": ("INCEPTION_FILES", "LPIPS_TRUNK_FILES", "ExtractorInfo", "describe_extractor",
                   "load_inception", "load_lpips"),
    "fidelity": ("GarmentRetrievalRecall", "ImageEncoder", "from_pil_encoder"),
    "paired": ("LPIPS", "PSNR", "SSIM"),
    "protocol": ("CATVTON", "DEFAULT_PROTOCOL", "FASHION_RAG", "PROTOCOLS", "Protocol", "get_protocol"),
    "report": ("EvaluationReport", "MetricResult"),
    "retrieval": ("first_relevant_rank", "recall_at_k", "relevance_from_labels", "retrieval_metrics",
                  "topk_accuracy"),
    "suite": ("EvaluationSuite", "Extractors", "GarmentGallery"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'fashionshoot.metrics' has no attribute {name!r}")
    return getattr(importlib.import_module(f"fashionshoot.metrics.{module}"), name)


def __dir__() -> list[str]:
    return __all__
