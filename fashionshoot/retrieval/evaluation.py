"""Retrieval benchmarks: Recall@k / Precision@k on score matrices, and the protocols that make them.

Every protocol reduces to a :class:`RetrievalTask`: queries, a gallery, and a boolean matrix of which
gallery items are right for each query. Any scorer with ``score(queries, gallery) -> {name: (Q, G)}``
(and ``score_texts`` for text queries), normally a
:class:`~fashionshoot.retrieval.ensemble.RetrievalEnsemble`, is evaluated per member and fused in one
pass, so the table compares them on identical queries. Protocols:

- synthetic set: garment -> lookbook (or the reverse), positives from ``pairs.jsonl``;
- Dress Code: in-shop garment ``_1`` <-> model image ``_0`` of the same id;
- DeepFashion2 consumer -> shop: user items vs shop items, positive iff same ``pair_id`` and same
  ``style > 0``; a query the detector missed counts as a miss (``found`` mask), as in the official
  top-k accuracy;
- Fashion-RAG text -> garment: captions vs garment images, reported as ``recall_k``/``precision_k``
  for k in 1, 3, 5, 10, 20 like the shipped retrieval JSONs.

Ties: a query hits at k iff fewer than k negatives score **at least** as high as its best positive,
so ties never flatter a model (``torch.topk`` would break them arbitrarily).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from fashionshoot.data.images import load_image
from fashionshoot.errors import DataError

RAG_KS: tuple[int, ...] = (1, 3, 5, 10, 20)


class Scorer(Protocol):
    """Scores queries against a gallery: member names (plus ``"fused"``) -> ``(Q, G)`` scores.

    :class:`~fashionshoot.retrieval.ensemble.RetrievalEnsemble` is one; text-query tasks also need
    ``score_texts(texts, gallery)`` with the same output.
    """

    def score(self, queries: Sequence[Any], gallery: Sequence[Image.Image]) -> dict[str, torch.Tensor]: ...


def first_positive_rank(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best positive (ties counted against it); ``inf`` with no positive."""
    if scores.shape != positives.shape or scores.ndim != 2:
        raise DataError(f"scores {tuple(scores.shape)} and positives {tuple(positives.shape)} must be equal (Q, G)")
    positives = positives.bool()
    scores = scores.float()
    best_pos = scores.masked_fill(~positives, float("-inf")).amax(dim=1, keepdim=True)
    above = ((scores >= best_pos) & ~positives).sum(dim=1).float() + 1
    return torch.where(positives.any(dim=1), above, torch.full_like(above, float("inf")))


def recall_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                found: torch.Tensor | None = None) -> dict[str, float]:
    """``R@k``: fraction of queries with a positive in their top k.

    Queries without any positive in the gallery are left out (they cannot be answered); ``found``
    marks queries that reached retrieval at all (e.g. detected), and a not-found query is a miss.
    """
    rank = first_positive_rank(scores, positives)
    answerable = positives.bool().any(dim=1)
    if found is not None:
        rank = torch.where(found.bool(), rank, torch.full_like(rank, float("inf")))
    n = int(answerable.sum())
    if n == 0:
        raise DataError("recall_at_k: no query has a positive in the gallery")
    return {f"R@{k}": float(((rank <= k) & answerable).sum()) / n for k in ks}


def precision_at_k(scores: torch.Tensor, positives: torch.Tensor, ks: Sequence[int],
                   found: torch.Tensor | None = None) -> dict[str, float]:
    """Mean fraction of positives among each query's top k (k capped at the gallery size).

    The same queries count as for :func:`recall_at_k`, so the two metrics of one task agree: queries
    without any positive are left out, and a not-found query (``found`` False) scores 0.
    """
    answerable = positives.bool().any(dim=1)
    n = int(answerable.sum())
    if n == 0:
        raise DataError("precision_at_k: no query has a positive in the gallery")
    reached = answerable if found is None else answerable & found.bool()
    ranked = positives.bool().gather(1, scores.float().topk(min(max(ks), scores.shape[1]), dim=1).indices)
    out = {}
    for k in ks:
        precision = ranked[:, :k].float().sum(dim=1).div(k)
        out[f"P@{k}"] = float(precision[reached].sum()) / n
    return out


@dataclass
class RetrievalTask:
    """One benchmark: ``queries`` (images, or texts when ``text_queries``) against ``gallery`` images."""

    name: str
    queries: Sequence[Any]
    gallery: Sequence[Image.Image]
    positives: torch.Tensor
    found: torch.Tensor | None = None
    text_queries: bool = False
    protocol: dict[str, Any] = field(default_factory=dict)


def evaluate(scorer: Scorer, task: RetrievalTask, ks: Sequence[int] = (1, 5, 10),
             precision: bool = False) -> dict[str, dict[str, float]]:
    """Metrics per scorer output (members and fused) for one task."""
    if task.text_queries:
        if not hasattr(scorer, "score_texts"):
            raise DataError(f"{task.name}: text queries need a scorer with score_texts (e.g. RetrievalEnsemble)")
        scores = scorer.score_texts(task.queries, task.gallery)
    else:
        scores = scorer.score(task.queries, task.gallery)
    out = {}
    for name, s in scores.items():
        metrics = recall_at_k(s, task.positives, ks, task.found)
        if precision:
            metrics.update(precision_at_k(s, task.positives, ks, task.found))
        out[name] = metrics
    return out


def markdown_table(results: Mapping[str, Mapping[str, Mapping[str, float]]], ks: Sequence[int] = (1, 5, 10)) -> str:
    """``{task: {model: {R@k: value}}}`` as the paper-style table (percentages, one row per model)."""
    lines = ["| task | model | " + " | ".join(f"R@{k}" for k in ks) + " |",
             "|---|---|" + "---|" * len(ks)]
    for task, rows in results.items():
        for model, metrics in rows.items():
            lines.append(f"| {task} | {model} | " + " | ".join(f"{100 * metrics[f'R@{k}']:.1f}" for k in ks) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Protocols
# --------------------------------------------------------------------------------------------------


def _positives(query_keys: Sequence[Any], gallery_keys: Sequence[Any]) -> torch.Tensor:
    index: dict[Any, list[int]] = {}
    for j, key in enumerate(gallery_keys):
        index.setdefault(key, []).append(j)
    out = torch.zeros(len(query_keys), len(gallery_keys), dtype=torch.bool)
    for i, key in enumerate(query_keys):
        out[i, index.get(key, [])] = True
    return out


def synthetic_task(root: str | Path, direction: str = "garment->lookbook", limit: int | None = None) -> RetrievalTask:
    """The synthetic set (written by ``write_synthetic_set``): garments vs their lookbooks."""
    root = Path(root)
    pairs = [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines() if line.strip()]
    garments = sorted({(p["garment_id"], p["garment_image"]) for p in pairs})[:limit]
    keep = {g for g, _ in garments}
    pairs = [p for p in pairs if p["garment_id"] in keep]
    g_images = [load_image(root / path) for _, path in garments]
    l_images = [load_image(root / p["lookbook_image"]) for p in pairs]
    g_keys, l_keys = [g for g, _ in garments], [p["garment_id"] for p in pairs]
    protocol = {"set": "synthetic", "root": str(root), "direction": direction}
    if direction == "garment->lookbook":
        return RetrievalTask("synthetic g->l", g_images, l_images, _positives(g_keys, l_keys), protocol=protocol)
    if direction == "lookbook->garment":
        return RetrievalTask("synthetic l->g", l_images, g_images, _positives(l_keys, g_keys), protocol=protocol)
    raise DataError(f"direction {direction!r}: expected 'garment->lookbook' or 'lookbook->garment'")


def synthetic_text_task(root: str | Path, limit: int | None = None) -> RetrievalTask:
    """Fashion-RAG's protocol on the synthetic catalogue: each garment's caption retrieves its image."""
    root = Path(root)
    rows = [json.loads(line) for line in (root / "garments.jsonl").read_text().splitlines() if line.strip()][:limit]
    images = [load_image(root / r["image"]) for r in rows]
    ids = [r["garment_id"] for r in rows]
    return RetrievalTask("synthetic text->garment", [r["caption"] for r in rows], images, _positives(ids, ids),
                         text_queries=True, protocol={"set": "synthetic", "root": str(root), "ks": list(RAG_KS)})


def dresscode_task(dataset: Any, direction: str = "garment->model") -> RetrievalTask:
    """Dress Code (a :class:`~fashionshoot.data.sets.DressCode`): in-shop ``cloth`` vs model ``image``."""
    samples = [dataset[i] for i in range(len(dataset))]
    ids = [s["garment_id"] for s in samples]
    cloth, person = [s["cloth"] for s in samples], [s["image"] for s in samples]
    protocol = {"set": "dresscode", "split": dataset.split, "categories": list(dataset.categories),
                "direction": direction}
    if direction == "garment->model":
        return RetrievalTask("dresscode g->m", cloth, person, _positives(ids, ids), protocol=protocol)
    if direction == "model->garment":
        return RetrievalTask("dresscode m->g", person, cloth, _positives(ids, ids), protocol=protocol)
    raise DataError(f"direction {direction!r}: expected 'garment->model' or 'model->garment'")


def deepfashion2_task(dataset: Any, found: Sequence[bool] | None = None) -> RetrievalTask:
    """DeepFashion2 consumer-to-shop on item crops (build the dataset with ``crop=True``).

    Queries are user items with ``style > 0``, the gallery all shop items. ``found`` (per query, in
    that order) marks the queries your detector localised; by default every query uses its
    ground-truth box (the README's "with GT boxes" setting).
    """
    samples = [dataset[i] for i in range(len(dataset))]
    queries = [s for s in samples if s["source"] == "user" and s["style"] > 0]
    gallery = [s for s in samples if s["source"] == "shop"]
    q_keys = [(s["pair_id"], s["style"]) for s in queries]
    g_keys = [(s["pair_id"], s["style"]) if s["style"] > 0 else None for s in gallery]
    mask = None if found is None else torch.tensor(list(found), dtype=torch.bool)
    if mask is not None and mask.shape != (len(queries),):
        raise DataError(f"deepfashion2: found has {mask.numel()} entries for {len(queries)} queries")
    return RetrievalTask("deepfashion2 c->s", [s["image"] for s in queries], [s["image"] for s in gallery],
                         _positives(q_keys, g_keys), found=mask,
                         protocol={"set": "deepfashion2", "split": dataset.split,
                                   "boxes": "ground truth" if found is None else "detected"})
