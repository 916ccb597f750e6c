"""Garment fidelity as retrieval: can the source garment be found again from the generated image?

Why: CLIP-I says a generated image looks *like* a garment; it does not say it shows *the* garment.
Here every generated image is a query against a gallery of catalogue garments, embedded by any
retrieval encoder, and the metric is Recall@k of its own source garment (R@1/5/10 by default, the
protocol's ``retrieval_ks``). The encoder is any callable mapping an (N, 3, H, W) float [0, 1] batch to
(N, D) embeddings — a CLIP backend's ``embed_images``, a retrieval ensemble's, or a test encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchvision.transforms.functional import to_pil_image

from fashionshoot.errors import DataError
from fashionshoot.metrics.base import ProtocolMixin
from fashionshoot.metrics.extractors import ExtractorInfo, describe_extractor
from fashionshoot.metrics.images import Images, as_list, to_unit
from fashionshoot.metrics.protocol import Protocol, Setting
from fashionshoot.metrics.report import AGGREGATE, MetricResult
from fashionshoot.metrics.retrieval import first_relevant_rank, recall_at_k

ImageEncoder = Callable[[Tensor], Tensor]


def from_pil_encoder(embed_images: Callable[[Sequence[Image.Image]], Tensor]) -> ImageEncoder:
    """Adapt a PIL-based ``embed_images`` (e.g. a :mod:`fashionshoot.retrieval` encoder or ensemble)."""

    def encode(images: Tensor) -> Tensor:
        return embed_images([to_pil_image((to_unit(i) * 255).round().byte().cpu()) for i in images])

    return encode


def _equal_size_runs(items: Sequence[Tensor], batch_size: int) -> Iterator[list[Tensor]]:
    """Consecutive images of one size, at most ``batch_size`` at a time, in order.

    Why: an encoder takes an (N, 3, H, W) batch, but catalogue garments and generated images come in any
    size; stacking only equal-size neighbours keeps the order and never resizes behind the encoder's back.
    """
    start = 0
    while start < len(items):
        end = start + 1
        while end < len(items) and end - start < batch_size and items[end].shape == items[start].shape:
            end += 1
        yield list(items[start:end])
        start = end


def embed(encoder: ImageEncoder, images: Images, batch_size: int = 64) -> Tensor:
    """L2-normalised embeddings of ``images`` of any sizes, in order; runs of equal-size images are stacked
    into batches of at most ``batch_size``."""
    items = [to_unit(i) for i in as_list(images)]
    if not items:
        raise DataError("cannot embed an empty set of images")
    with torch.no_grad():
        out = torch.cat([encoder(torch.stack(run)).float() for run in _equal_size_runs(items, batch_size)])
    return out / out.norm(dim=-1, keepdim=True)


class GarmentRetrievalRecall(ProtocolMixin, Metric):
    """Recall@k of each generated image's source garment in a fixed gallery of garments."""

    metric_name = "garment_recall"
    protocol_fields = ("retrieval_ks",)
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        encoder: ImageEncoder,
        gallery_embeddings: Tensor,
        gallery_ids: Sequence[str],
        protocol: Protocol | None = None,
        setting: Setting = "paired",
        encoder_info: ExtractorInfo | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._init_protocol(protocol, setting, encoder_info or describe_extractor(encoder))
        if len(gallery_ids) != gallery_embeddings.shape[0]:
            raise ValueError(f"{len(gallery_ids)} gallery ids for {gallery_embeddings.shape[0]} gallery embeddings")
        self.encoder = encoder
        self.gallery = gallery_embeddings / gallery_embeddings.norm(dim=-1, keepdim=True)
        self.index = {str(g): i for i, g in enumerate(gallery_ids)}
        if len(self.index) != len(gallery_ids):
            raise ValueError("gallery ids must be unique")
        self.add_state("ranks", [], dist_reduce_fx="cat")

    @classmethod
    def from_gallery_images(
        cls, encoder: ImageEncoder, images: Images, gallery_ids: Sequence[str], batch_size: int = 64, **kwargs: Any
    ) -> GarmentRetrievalRecall:
        """Embed the gallery once with ``encoder`` and build the metric."""
        return cls(encoder, embed(encoder, images, batch_size), gallery_ids, **kwargs)

    def update(self, images: Images, garment_ids: Sequence[str]) -> None:
        items = as_list(images)
        if len(items) != len(garment_ids):
            raise ValueError(f"garment recall got {len(items)} images but {len(garment_ids)} garment ids")
        missing = [g for g in garment_ids if str(g) not in self.index]
        if missing:
            raise DataError(f"source garment(s) {missing[:5]} are not in the gallery ({len(missing)} missing)")
        queries = embed(self.encoder, items, batch_size=len(items))
        gallery = self.gallery.to(queries.device)
        target = torch.tensor([self.index[str(g)] for g in garment_ids], device=queries.device)
        relevant = torch.zeros(len(items), gallery.shape[0], dtype=torch.bool, device=queries.device)
        relevant[torch.arange(len(items)), target] = True
        self.ranks.append(first_relevant_rank(queries @ gallery.T, relevant))

    def _ranks(self) -> Tensor:
        """Every query's rank so far (after a DDP sync the state is one tensor, before it a list)."""
        ranks = self.ranks
        if isinstance(ranks, list):
            ranks = dim_zero_cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)
        if ranks.numel() == 0:
            raise RuntimeError("garment recall: compute() called before any update()")
        return ranks

    def compute(self) -> dict[int, float]:
        return recall_at_k(self._ranks(), self.protocol.retrieval_ks)

    def results(self, category: str = AGGREGATE) -> list[MetricResult]:
        """One result per k, named ``garment_r@k``; recall and n from the ranks of every process."""
        with self.synced_states():
            ranks = self._ranks()
            recalls = recall_at_k(ranks, self.protocol.retrieval_ks)
        details = {"gallery_size": int(self.gallery.shape[0])}
        return [
            MetricResult(metric=f"garment_r@{k}", value=v, n=int(ranks.numel()), category=category,
                         details=details, protocol=self.protocol_record())
            for k, v in recalls.items()
        ]
