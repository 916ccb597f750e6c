"""RetrievalEnsemble: several retrieval members scored on the same candidates and fused.

The paper's "Total-Ensemble" combines zero-shot SigLIP2 with ProxyNCA++ and Hyp-DINO metric learners
and beats every single model by a wide margin; which members, and with what weights and fusion, is a
configuration choice (:class:`EnsembleConfig`), so ablations are config edits. A member is any
:class:`~fashionshoot.retrieval.encoders.Encoder`; members are configured and loaded by
:mod:`fashionshoot.retrieval.members` (metric heads join as a
:class:`~fashionshoot.retrieval.members.HeadEncoder`: frozen backbone features -> head). Each member
ranks with its own geometry (:func:`~fashionshoot.retrieval.members.similarity`: cosine, or the
negative Poincaré distance of a hyperbolic head); scores are made comparable and
combined by :func:`~fashionshoot.retrieval.fusion.fuse_scores`.

API used by evaluation and the pair builder::

    ensemble = RetrievalEnsemble.from_config(EnsembleConfig(members=[...], fusion="zscore"))
    scores = ensemble.score(query_images, gallery_images)   # {member: (Q, G), ..., "fused": (Q, G)}
    scores = ensemble.score_texts(captions, gallery_images)  # text queries, members with a text tower
    gallery = ensemble.embed(gallery_images)                 # {member: (G, D_member)}, embed once
    result = ensemble.search(query_images, gallery, k=10)    # SearchResult of fused scores, best first
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.encoders import Encoder
from fashionshoot.retrieval.fusion import FUSION_METHODS, FusionMethod, fuse_scores
from fashionshoot.retrieval.index import ExactIndex, SearchResult, merge_topk
from fashionshoot.retrieval.members import MemberConfig, build_members, similarity

Embeddings = Mapping[str, torch.Tensor]
FUSED = "fused"


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class EnsembleConfig:
    """Members, fusion and search settings of a :class:`RetrievalEnsemble`.

    ``shortlist``: per-member candidates kept when searching a gallery larger than
    ``shortlist * members``; the union is re-scored by every member and fused (0: always exact).
    """

    members: list[MemberConfig] = field(default_factory=list)
    fusion: FusionMethod = "zscore"
    rrf_k: float = 60.0
    shortlist: int = 256
    batch_size: int = 64
    device: str = "cpu"

    def __post_init__(self) -> None:
        names = [m.name for m in self.members]
        if any(not n or n == FUSED for n in names) or len(set(names)) != len(names):
            raise ConfigError(f"ensemble.members: names must be unique, non-empty and not {FUSED!r}, got {names}")
        if self.fusion not in FUSION_METHODS:
            raise ConfigError(f"ensemble.fusion {self.fusion!r}: expected one of {FUSION_METHODS}")


# --------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------


class RetrievalEnsemble:
    """Members -> per-member scores -> fused scores -> ranked results.

    ``members`` maps names to encoders (anything with ``embed_images``; a ``similarity`` method
    overrides cosine). ``weights`` (name -> weight, default 1) and ``fusion`` go to
    :func:`~fashionshoot.retrieval.fusion.fuse_scores`. Scores are always ``(queries, gallery)``
    matrices with higher = better; the key ``"fused"`` holds the fusion.
    """

    def __init__(self, members: Mapping[str, Encoder], fusion: FusionMethod = "zscore",
                 weights: Mapping[str, float] | None = None, rrf_k: float = 60.0, shortlist: int = 256) -> None:
        if not members:
            raise ConfigError("RetrievalEnsemble needs at least one member")
        if FUSED in members:
            raise ConfigError(f"member name {FUSED!r} is reserved for the fused scores")
        self.members = dict(members)
        self.fusion, self.weights, self.rrf_k, self.shortlist = fusion, dict(weights or {}), rrf_k, shortlist

    @classmethod
    def from_config(cls, config: EnsembleConfig) -> RetrievalEnsemble:
        """Load every member (sharing backbones between members that use the same one)."""
        if not config.members:
            raise ConfigError("ensemble.members is empty")
        members = build_members(config.members, config.device, config.batch_size)
        return cls(members, config.fusion, {m.name: m.weight for m in config.members}, config.rrf_k, config.shortlist)

    # -- embedding and scoring ---------------------------------------------------------------------

    def embed(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """Every member's embeddings of ``images``: embed a gallery once, search it many times."""
        if not images:
            raise DataError("ensemble: nothing to embed (empty input)")
        return {name: member.embed_images(images) for name, member in self.members.items()}

    def _embeddings(self, items: Sequence[Image.Image] | Embeddings) -> Embeddings:
        if isinstance(items, Mapping):
            missing = set(self.members) - set(items)
            if missing:
                raise DataError(f"ensemble: precomputed embeddings lack member(s) {sorted(missing)}")
            return items
        return self.embed(items)

    def fuse(self, member_scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Fuse per-member ``(Q, C)`` scores with the ensemble's method and weights."""
        return fuse_scores(member_scores, self.fusion, self.weights, self.rrf_k)

    def member_scores(self, queries: Embeddings, gallery: Embeddings) -> dict[str, torch.Tensor]:
        """Per-member ``(Q, G)`` scores of precomputed embeddings (no fusion)."""
        return {name: similarity(m, queries[name], gallery[name]).float() for name, m in self.members.items()}

    def score(self, queries: Sequence[Image.Image] | Embeddings,
              gallery: Sequence[Image.Image] | Embeddings) -> dict[str, torch.Tensor]:
        """``{member: (Q, G), ..., "fused": (Q, G)}`` for query and gallery images (or their
        :meth:`embed` outputs). Fusion normalises over the whole gallery row of each query."""
        scores = self.member_scores(self._embeddings(queries), self._embeddings(gallery))
        scores[FUSED] = self.fuse(scores)
        return scores

    def score_texts(self, texts: Sequence[str], gallery: Sequence[Image.Image] | Embeddings) -> dict[str, torch.Tensor]:
        """Like :meth:`score` with text queries, over the members that embed texts (image-only
        members such as metric heads, ``embeds_texts = False``, are left out of scores and fusion)."""
        names = [name for name, m in self.members.items() if getattr(m, "embeds_texts", True)]
        if not names:
            raise DataError("ensemble: no member embeds texts (metric heads are image-only)")
        if not texts:
            raise DataError("ensemble: nothing to embed (empty input)")
        g = self._embeddings(gallery)
        scores = {n: similarity(self.members[n], self.members[n].embed_texts(texts), g[n]).float() for n in names}
        scores[FUSED] = fuse_scores(scores, self.fusion, {n: w for n, w in self.weights.items() if n in names},
                                    self.rrf_k)
        return scores

    # -- search ------------------------------------------------------------------------------------

    def search(self, queries: Sequence[Image.Image] | Embeddings, gallery: Sequence[Image.Image] | Embeddings,
               k: int, shortlist: int | None = None, block_elements: int = 1 << 24) -> SearchResult:
        """Top-``k`` gallery rows per query by fused score, best first (``k`` capped at the gallery size).

        Exact when the gallery has at most ``shortlist * members`` rows (or ``shortlist`` is 0): all
        members score the full gallery in query blocks of about ``block_elements`` scores. Otherwise
        each member shortlists its own top ``shortlist`` rows (an :class:`ExactIndex` for cosine
        members, a chunked scan with the member's own similarity otherwise), and the union of the
        shortlists is re-scored by *every* member and fused per query. Fusion statistics are then
        taken over that union: a re-ranking of candidates, which is how large galleries are searched.
        """
        q, g = self._embeddings(queries), self._embeddings(gallery)
        size = _rows(g)
        k = min(k, size)
        shortlist = self.shortlist if shortlist is None else shortlist
        if shortlist <= 0 or shortlist * len(self.members) >= size:
            return self._search_exact(q, g, k, block_elements)
        return self._search_shortlist(q, g, k, shortlist)

    def _search_exact(self, q: Embeddings, g: Embeddings, k: int, block_elements: int) -> SearchResult:
        block = max(1, block_elements // _rows(g))
        parts = []
        for start in range(0, _rows(q), block):
            q_block = {name: emb[start : start + block] for name, emb in q.items()}
            fused = self.fuse(self.member_scores(q_block, g))
            top = fused.topk(k, dim=1)
            parts.append(SearchResult(top.values, top.indices))
        return SearchResult(torch.cat([p.scores for p in parts]), torch.cat([p.indices for p in parts]))

    def _search_shortlist(self, q: Embeddings, g: Embeddings, k: int, shortlist: int,
                          block_elements: int = 1 << 24) -> SearchResult:
        candidates = torch.cat([self._member_candidates(name, q[name], g[name], shortlist)
                                for name in self.members], dim=1)
        # Per query, the union of the shortlists: sort, drop repeats. Queries with equally large unions
        # are re-scored and fused together, so fusion statistics never see a duplicate or a pad.
        ordered = candidates.sort(dim=1).values
        fresh = torch.ones_like(ordered, dtype=torch.bool)
        fresh[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        sizes = fresh.sum(dim=1)
        scores = torch.full((len(ordered), k), float("-inf"))
        indices = torch.full((len(ordered), k), -1, dtype=torch.long)
        dim = max(e.shape[1] for e in g.values())
        for size in sizes.unique().tolist():
            rows_all = (sizes == size).nonzero().squeeze(1)
            for rows in rows_all.split(max(1, block_elements // (size * dim))):
                union = ordered[rows][fresh[rows]].view(len(rows), size)
                member_scores = {name: similarity(m, q[name][rows].unsqueeze(1), g[name][union]).squeeze(1).float()
                                 for name, m in self.members.items()}
                top = self.fuse(member_scores).topk(min(k, size), dim=1)
                scores[rows, : top.values.shape[1]] = top.values
                indices[rows, : top.values.shape[1]] = union.gather(1, top.indices)
        return SearchResult(scores, indices)

    def _member_candidates(self, name: str, q: torch.Tensor, g: torch.Tensor, shortlist: int) -> torch.Tensor:
        member = self.members[name]
        if not callable(getattr(member, "similarity", None)):
            return ExactIndex(g, storage_dtype=g.dtype).search(q, shortlist).indices
        return chunked_topk(lambda chunk: member.similarity(q, chunk), g, shortlist).indices


def chunked_topk(score_chunk: Callable[[torch.Tensor], torch.Tensor], gallery: torch.Tensor, k: int,
                 chunk_size: int = 4096) -> SearchResult:
    """Top-``k`` over ``gallery`` rows for any similarity, scanning ``chunk_size`` rows at a time."""
    best: SearchResult | None = None
    for offset in range(0, gallery.shape[0], chunk_size):
        best = merge_topk(best, score_chunk(gallery[offset : offset + chunk_size]), offset, k)
    assert best is not None
    return best


def _rows(embeddings: Embeddings) -> int:
    counts = {int(e.shape[0]) for e in embeddings.values()}
    if len(counts) != 1:
        raise DataError(f"ensemble: members embedded different numbers of items {sorted(counts)}")
    return counts.pop()
