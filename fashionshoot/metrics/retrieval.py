"""Retrieval metrics from a query x gallery score matrix: Recall@k for any k, precision@k, mAP, and
DeepFashion2-style top-k accuracy in which an undetected query counts as a miss.

Conventions (stated because papers differ):

* **Recall@k** is the metric-learning one (In-Shop, SOP, CUB): the fraction of queries with at least one
  relevant gallery item among the top k. :func:`retrieval_metrics` also reports ``recall_fraction@k``
  (relevant items found in the top k / relevant items), the information-retrieval recall.
* **Ties** are broken by gallery order: among equal scores the lower gallery index ranks first, exactly
  as a stable descending sort does — deterministic, and independent of the top-k kernel used.
* **Queries with no relevant gallery item** count as misses (recall 0, AP 0) and stay in the
  denominator; so do queries marked undetected (``detected=False``), the DeepFashion2 rule.

Scores are processed in query chunks so a 60k-item gallery does not need a (Q, G) sort in memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_CHUNK = 1024
#: The rank given to a query with no retrievable relevant item: larger than any k.
MISS = torch.iinfo(torch.long).max


def _check(scores: Tensor, relevant: Tensor, detected: Tensor | None) -> Tensor:
    if scores.ndim != 2 or scores.shape != relevant.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and relevant {tuple(relevant.shape)} must be equal (Q, G)")
    if detected is None:
        return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    if detected.shape != (scores.shape[0],):
        raise ValueError(f"detected must have one flag per query, got shape {tuple(detected.shape)}")
    return detected.to(device=scores.device, dtype=torch.bool)


def relevance_from_labels(query_labels: Tensor, gallery_labels: Tensor) -> Tensor:
    """(Q, G) relevance: a gallery item is relevant when it shares the query's label (item / garment id)."""
    return query_labels.reshape(-1, 1) == gallery_labels.reshape(1, -1)


def first_relevant_rank(scores: Tensor, relevant: Tensor, detected: Tensor | None = None) -> Tensor:
    """0-based rank of each query's best-ranked relevant item; :data:`MISS` when there is none.

    rank = #(items scoring higher) + #(items scoring equal with a lower gallery index): a stable sort.
    """
    detected = _check(scores, relevant, detected)
    n_gallery = scores.shape[1]
    ranks = torch.full((scores.shape[0],), MISS, dtype=torch.long, device=scores.device)
    index = torch.arange(n_gallery, device=scores.device)
    for start in range(0, scores.shape[0], _CHUNK):
        s = scores[start : start + _CHUNK]
        r = relevant[start : start + _CHUNK].bool()
        best = s.masked_fill(~r, float("-inf")).max(dim=1, keepdim=True).values
        first = torch.where(r & (s == best), index, n_gallery).min(dim=1, keepdim=True).values
        rank = (s > best).sum(1) + ((s == best) & (index < first)).sum(1)
        ranks[start : start + _CHUNK] = torch.where(r.any(1), rank, MISS)
    return torch.where(detected, ranks, MISS)


def recall_at_k(ranks: Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Recall@k from :func:`first_relevant_rank`: the share of queries whose first relevant rank < k."""
    if ranks.numel() == 0:
        raise ValueError("recall@k of zero queries is undefined")
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def topk_accuracy(
    scores: Tensor, relevant: Tensor, detected: Tensor, ks: Sequence[int] = (1, 5, 10, 20)
) -> dict[int, float]:
    """DeepFashion2 consumer-to-shop top-k accuracy: a query whose garment was not detected is a miss."""
    return recall_at_k(first_relevant_rank(scores, relevant, detected), ks)


def retrieval_metrics(
    scores: Tensor, relevant: Tensor, ks: Sequence[int] = (1, 5, 10), detected: Tensor | None = None
) -> dict[str, float]:
    """Recall@k, recall_fraction@k, precision@k and mAP over all queries (see the module conventions)."""
    detected = _check(scores, relevant, detected)
    n_query, n_gallery = scores.shape
    if n_query == 0:
        raise ValueError("retrieval metrics of zero queries are undefined")
    sums = {f"{name}@{k}": 0.0 for k in ks for name in ("recall", "recall_fraction", "precision")}
    sums["mAP"] = 0.0
    positions = torch.arange(1, n_gallery + 1, device=scores.device, dtype=torch.float64)
    for start in range(0, n_query, _CHUNK):
        s = scores[start : start + _CHUNK]
        r = relevant[start : start + _CHUNK].bool() & detected[start : start + _CHUNK, None]
        order = torch.sort(s, dim=1, descending=True, stable=True).indices
        ranked = torch.gather(r, 1, order).double()
        cum = ranked.cumsum(1)
        n_rel = cum[:, -1].clamp_min(1)
        sums["mAP"] += float(((ranked * cum / positions).sum(1) / n_rel).sum())
        for k in ks:
            found = cum[:, min(k, n_gallery) - 1]
            sums[f"recall@{k}"] += float((found > 0).sum())
            sums[f"recall_fraction@{k}"] += float((found / n_rel).sum())
            sums[f"precision@{k}"] += float((found / k).sum())
    return {name: total / n_query for name, total in sums.items()}
