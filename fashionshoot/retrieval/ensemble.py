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
    gallery = ensemble.prepare(gallery_images)               # the same + cached gallery moments (fast path)
    result = ensemble.search(query_images, gallery, k=10)    # SearchResult of fused scores, best first

Cost. Fusion is computed while each member's scores are still in cache: :meth:`score` fills the
member matrices one gallery chunk at a time and folds each chunk into the fused matrix at once.
When every member scores by dot product (cosine) and fusion is ``zscore`` or ``weighted``, the
per-query statistics are analytic (:func:`~fashionshoot.retrieval.fusion.gallery_moments`, computed
once per gallery tensor and cached), so fused scores need no pass of their own, and :meth:`search`
is one exact chunked scan (:class:`ExactIndex` over the members' galleries side by side, with
pre-scaled queries): exact over the whole gallery, at the cost of the members' own scans.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.encoders import Encoder
from fashionshoot.retrieval.fusion import (
    _EPS,
    FUSION_METHODS,
    FusionMethod,
    GalleryMoments,
    dot_mean_std,
    fuse_scores,
    fusion_shares,
    gallery_moments,
    linear_fusion,
)
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
    All-cosine ensembles under ``zscore`` or ``weighted`` fusion do not use it: their search is
    always exact, at the cost of the members' own scans (see :meth:`RetrievalEnsemble.search`).
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
        """Per-member ``(Q, G)`` scores of precomputed embeddings (no fusion), computed in the same
        cache-sized tiles as :meth:`score`."""
        return self._score(queries, gallery, list(self.members), self.weights, fuse=False)

    def score(self, queries: Sequence[Image.Image] | Embeddings,
              gallery: Sequence[Image.Image] | Embeddings) -> dict[str, torch.Tensor]:
        """``{member: (Q, G), ..., "fused": (Q, G)}`` for query and gallery images (or their
        :meth:`embed` outputs). Fusion normalises over the whole gallery row of each query."""
        return self._score(self._embeddings(queries), self._embeddings(gallery), list(self.members), self.weights)

    def score_texts(self, texts: Sequence[str], gallery: Sequence[Image.Image] | Embeddings) -> dict[str, torch.Tensor]:
        """Like :meth:`score` with text queries, over the members that embed texts (image-only
        members such as metric heads, ``embeds_texts = False``, are left out of scores and fusion)."""
        names = [name for name, m in self.members.items() if getattr(m, "embeds_texts", True)]
        if not names:
            raise DataError("ensemble: no member embeds texts (metric heads are image-only)")
        if not texts:
            raise DataError("ensemble: nothing to embed (empty input)")
        g = self._embeddings(gallery)
        q = {n: self.members[n].embed_texts(texts) for n in names}
        return self._score(q, g, names, {n: w for n, w in self.weights.items() if n in names})

    def _score(self, q: Embeddings, g: Embeddings, names: list[str], weights: Mapping[str, float],
               tile_bytes: int = 1 << 21, query_block: int = 1024, fuse: bool = True) -> dict[str, torch.Tensor]:
        """Member scores and their fusion, one ``(query block, gallery chunk)`` tile at a time: each
        member's tile is written to its output and folded into the fused tile while in cache (members
        with known scale: ``weighted``, or dot-product members under ``zscore``), or its row
        statistics are accumulated (sum and sum of squares, or min and max) for a second pass."""
        for name in names:
            if q[name].shape[-1] != g[name].shape[-1]:
                raise DataError(f"member {name!r}: query embeddings have dim {q[name].shape[-1]}, "
                                f"gallery embeddings dim {g[name].shape[-1]}")
        n_queries, size = _rows({n: q[n] for n in names}), _rows({n: g[n] for n in names})
        if fuse and self.fusion == "rrf":  # ranks need whole rows: score, then fuse
            scores = {n: similarity(self.members[n], q[n], g[n]).float() for n in names}
            scores[FUSED] = fuse_scores(scores, "rrf", weights, self.rrf_k)
            return scores
        share = fusion_shares(names, weights)
        device = g[names[0]].device
        out = {n: torch.empty(n_queries, size, dtype=torch.float32, device=device) for n in names}
        fused = torch.empty(n_queries, size if fuse else 0, dtype=torch.float32, device=device)
        # Members whose per-query scale is known before scoring, and those that need row statistics.
        # Analytic statistics when the gallery's moments are cached, or cost less than this scoring
        # (about D queries' worth); otherwise a pass (same values to ~1e-5).
        known = [n for n in names if self.fusion == "weighted" or (
            self.fusion == "zscore" and self._dot(n) and (has_moments(g[n]) or n_queries >= g[n].shape[1]))]
        stats = [n for n in names if n not in known]
        if not fuse:
            known, stats = [], []
        for start in range(0, n_queries, query_block):
            rows = slice(start, start + query_block)
            q_rows = {n: q[n][rows] for n in names}
            scale: dict[str, torch.Tensor | float] = {}
            shift: torch.Tensor | float = 0.0
            for n in known:
                if self.fusion == "weighted":
                    scale[n] = share[n]
                else:
                    mean, std = dot_mean_std(q_rows[n].float(), cached_moments(g[n]))
                    scale[n] = share[n] / (std + _EPS)
                    shift = shift - mean * scale[n]
            count = len(q_rows[names[0]])
            acc = {n: [torch.zeros(count, 1, dtype=torch.float64, device=device) for _ in range(2)] for n in stats}
            if self.fusion == "minmax":
                acc = {n: [torch.full((count, 1), float("inf"), device=device),
                           torch.full((count, 1), float("-inf"), device=device)] for n in stats}
            pivot: dict[str, torch.Tensor] = {}
            chunk = max(256, tile_bytes // (4 * count))
            for col in range(0, size, chunk):
                cols = slice(col, col + chunk)
                first = True
                for n in names:
                    tile = out[n][rows, cols]
                    member, g_chunk = self.members[n], g[n][cols]
                    if self._dot(n):
                        torch.mm(q_rows[n].float(), g_chunk.float().T, out=tile)
                    else:
                        tile.copy_(similarity(member, q_rows[n], g_chunk))
                    if n in scale:
                        fused_tile = fused[rows, cols]
                        if first and isinstance(shift, torch.Tensor):  # the known shift folds in here
                            torch.addcmul(shift, tile, scale[n], out=fused_tile)
                        elif first:
                            torch.mul(tile, scale[n], out=fused_tile)
                        elif isinstance(scale[n], float):
                            fused_tile.add_(tile, alpha=scale[n])
                        else:
                            fused_tile.addcmul_(tile, scale[n])
                        first = False
                    elif n in stats and self.fusion == "zscore":
                        if col == 0:  # centre on the first tile's row mean: no cancellation later
                            pivot[n] = tile.mean(dim=1, keepdim=True)
                        centred = tile - pivot[n]
                        acc[n][0] += centred.sum(dim=1, keepdim=True, dtype=torch.float64)
                        acc[n][1] += torch.linalg.vecdot(centred, centred).unsqueeze(1).double()
                    elif n in stats:
                        low, high = tile.aminmax(dim=1, keepdim=True)
                        torch.minimum(acc[n][0], low, out=acc[n][0])
                        torch.maximum(acc[n][1], high, out=acc[n][1])
            # Second pass for members whose statistics needed the whole row (the known members' shift
            # is already in the fused tiles).
            fused_rows = fused[rows]
            shift = 0.0
            for number, n in enumerate(stats):
                if self.fusion == "zscore":
                    low, std = _row_mean_std(acc[n][0], acc[n][1], size, pivot[n])
                    factor = share[n] / (std + _EPS)
                else:
                    low, high = acc[n]
                    factor = share[n] / (high - low + _EPS)
                shift = shift - low * factor
                if number == 0 and not known:
                    torch.mul(out[n][rows], factor, out=fused_rows)
                else:
                    fused_rows.addcmul_(out[n][rows], factor)
            if stats and not isinstance(shift, float):
                fused_rows.add_(shift)
        if fuse:
            out[FUSED] = fused
        return out

    def _dot(self, name: str) -> bool:
        """Whether member ``name`` scores by plain inner product (no ``similarity`` of its own)."""
        return not callable(getattr(self.members[name], "similarity", None))

    def prepare(self, gallery: Sequence[Image.Image] | Embeddings) -> Embeddings:
        """Embed ``gallery`` (unless given embeddings) and cache the cosine members' gallery moments,
        so that later :meth:`score` and :meth:`search` calls with these embeddings take the fast
        path at once (the moments cost about as much as scoring ``D`` queries, once per tensor)."""
        g = self._embeddings(gallery)
        for name in self.members:
            if self._dot(name):
                cached_moments(g[name])
        return g

    # -- search ------------------------------------------------------------------------------------

    def search(self, queries: Sequence[Image.Image] | Embeddings, gallery: Sequence[Image.Image] | Embeddings,
               k: int, shortlist: int | None = None, block_elements: int = 1 << 24) -> SearchResult:
        """Top-``k`` gallery rows per query by fused score, best first (``k`` capped at the gallery size).

        When every member scores by dot product (cosine) and fusion is ``zscore`` or ``weighted``, the
        search is always exact over the whole gallery, whatever ``shortlist``: fusion is then linear
        in the query embeddings (z-score statistics from the gallery's cached moments), so one
        :class:`ExactIndex` scan over the members' galleries side by side, with pre-scaled queries,
        ranks by the fused score at the cost of the members' own scans, in bounded memory. The
        gallery's moments are computed on first use (about ``D`` queries' worth of scoring) and
        cached per tensor; :meth:`prepare` computes them up front.

        Otherwise it is exact when the gallery has at most ``shortlist * members`` rows (or ``shortlist`` is 0): all
        members score the full gallery in query blocks of about ``block_elements`` scores. Otherwise
        each member shortlists its own top ``shortlist`` rows (an :class:`ExactIndex` for cosine
        members, a chunked scan with the member's own similarity otherwise; at least ``k`` rows, so
        every result is filled), and the union of the
        shortlists is re-scored by *every* member and fused per query. Fusion statistics are then
        taken over that union: a re-ranking of candidates, which is how large galleries are searched.
        """
        q, g = self._embeddings(queries), self._embeddings(gallery)
        size = _rows(g)
        k = min(k, size)
        shortlist = self.shortlist if shortlist is None else shortlist
        if shortlist > 0:  # a shortlist shorter than k would leave the tail of every result padded
            shortlist = max(shortlist, k)
        if self.fusion in ("zscore", "weighted") and all(self._dot(n) for n in self.members):
            return self._search_linear(q, g, k)
        if shortlist <= 0 or shortlist * len(self.members) >= size:
            return self._search_exact(q, g, k, block_elements)
        return self._search_shortlist(q, g, k, shortlist)

    def _search_linear(self, q: Embeddings, g: Embeddings, k: int, chunk_size: int = 4096) -> SearchResult:
        """Exact fused top-k of dot-product members under a linear fusion: one :class:`ExactIndex`
        scan over the members' galleries side by side, with pre-scaled queries (bounded memory)."""
        names = list(self.members)
        moments = {n: cached_moments(g[n]) for n in names} if self.fusion == "zscore" else None
        scaled, shift = linear_fusion({n: q[n] for n in names}, moments, self.fusion, self.weights)
        parts = [g[n] for n in names]
        dtypes = {p.dtype for p in parts}
        storage = dtypes.pop() if len(dtypes) == 1 and parts[0].is_floating_point() else torch.float32
        index = ExactIndex(parts, chunk_size=chunk_size, storage_dtype=storage, device=parts[0].device)
        result = index.search(torch.cat([scaled[n] for n in names], dim=1), k)
        return SearchResult(result.scores + shift.to(result.scores.device), result.indices)

    def _search_exact(self, q: Embeddings, g: Embeddings, k: int, block_elements: int) -> SearchResult:
        block = max(1, block_elements // _rows(g))
        parts = []
        for start in range(0, _rows(q), block):
            q_block = {name: emb[start : start + block] for name, emb in q.items()}
            fused = self._score(q_block, g, list(self.members), self.weights)[FUSED]
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


def _row_mean_std(total: torch.Tensor, square: torch.Tensor, size: int,
                  pivot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row mean and population std ``(Q, 1)`` float32 from float64 sums of ``scores - pivot`` and of
    their squares (the pivot, near the mean, keeps the variance free of cancellation)."""
    offset = total / size
    var = (square / size - offset * offset).clamp_min_(0)
    return (offset + pivot.double()).float(), var.sqrt_().float()


_MOMENTS: dict[int, tuple[weakref.ref, int, GalleryMoments]] = {}


def has_moments(gallery: torch.Tensor) -> bool:
    """Whether :func:`cached_moments` holds current moments of ``gallery``."""
    hit = _MOMENTS.get(id(gallery))
    return hit is not None and hit[0]() is gallery and hit[1] == gallery._version


def cached_moments(gallery: torch.Tensor) -> GalleryMoments:
    """:func:`~fashionshoot.retrieval.fusion.gallery_moments` of ``gallery``, computed once per tensor
    object and reused while that object lives and is not modified in place (its version counter is
    checked; writes through ``.data`` bypass it, so don't)."""
    key = id(gallery)
    if has_moments(gallery):
        return _MOMENTS[key][2]
    moments = gallery_moments(gallery)
    _MOMENTS[key] = (weakref.ref(gallery, lambda _, key=key: _MOMENTS.pop(key, None)), gallery._version, moments)
    return moments
