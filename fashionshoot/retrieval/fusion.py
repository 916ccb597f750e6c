"""Score fusion: combine several retrieval members' scores for the same query x candidate grid.

Members disagree in scale (a cosine in [-1, 1], a negative hyperbolic distance in [-inf, 0]), so the
scores are made comparable per query before they are averaged:

- ``zscore``: per query, subtract the mean and divide by the standard deviation over candidates;
- ``minmax``: per query, map the scores to [0, 1];
- ``rrf``: reciprocal-rank fusion, ``sum_m w_m / (rrf_k + rank_m)`` with 1-based ranks (scale-free);
- ``weighted``: raw scores times weights, for members already on one scale.

Weights default to equal; every method returns a ``(queries, candidates)`` tensor, higher is better.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from fashionshoot.errors import DataError

FusionMethod = Literal["zscore", "minmax", "rrf", "weighted"]
FUSION_METHODS: tuple[str, ...] = ("zscore", "minmax", "rrf", "weighted")
_EPS = 1e-12


def zscore(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, unbiased=False, keepdim=True)
    return (scores - mean) / (std + _EPS)


def minmax(scores: torch.Tensor) -> torch.Tensor:
    low = scores.amin(dim=1, keepdim=True)
    high = scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low + _EPS)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """1-based rank of each candidate within its query row (1 = best)."""
    order = scores.argsort(dim=1, descending=True)
    out = torch.empty_like(order)
    positions = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(order)
    return out.scatter_(1, order, positions)


def fuse_scores(member_scores: Mapping[str, torch.Tensor], method: FusionMethod = "zscore",
                weights: Mapping[str, float] | None = None, rrf_k: float = 60.0) -> torch.Tensor:
    """Fuse ``{member: (Q, C) scores}`` into one ``(Q, C)`` score matrix."""
    if not member_scores:
        raise DataError("fusion: no member scores given")
    if method not in FUSION_METHODS:
        raise DataError(f"fusion method {method!r}: expected one of {FUSION_METHODS}")
    shapes = {name: tuple(s.shape) for name, s in member_scores.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        raise DataError(f"fusion: members must score the same (queries, candidates) grid, got {shapes}")
    weights = dict(weights or {})
    unknown = set(weights) - set(member_scores)
    if unknown:
        raise DataError(f"fusion: weights given for unknown member(s) {sorted(unknown)}")
    total_weight = sum(weights.get(name, 1.0) for name in member_scores)
    fused = None
    for name, scores in member_scores.items():
        scores = scores.float()
        if method == "zscore":
            part = zscore(scores)
        elif method == "minmax":
            part = minmax(scores)
        elif method == "rrf":
            part = 1.0 / (rrf_k + ranks(scores).float())
        else:
            part = scores
        part = part * (weights.get(name, 1.0) / total_weight)
        fused = part if fused is None else fused + part
    return fused
