"""RetrievalEnsemble: several retrieval members scored on the same candidates and fused.

The paper's "Total-Ensemble" combines zero-shot SigLIP2 with ProxyNCA++ and Hyp-DINO metric learners
and beats every single model by a wide margin; which members, and with what weights and fusion, is a
configuration choice (:class:`EnsembleConfig`), so ablations are config edits. A member is any
:class:`~fashionshoot.retrieval.encoders.Encoder`; metric heads join through :class:`HeadEncoder`
(frozen backbone features -> head). Each member ranks with its own geometry (:func:`similarity`:
cosine, or the negative Poincaré distance of a hyperbolic head); scores are made comparable and
combined by :func:`~fashionshoot.retrieval.fusion.fuse_scores`.

API used by evaluation and the pair builder::

    ensemble = RetrievalEnsemble.from_config(EnsembleConfig(members=[...], fusion="zscore"))
    scores = ensemble.score(query_images, gallery_images)   # {member: (Q, G), ..., "fused": (Q, G)}
    gallery = ensemble.embed(gallery_images)                 # {member: (G, D_member)}, embed once
    result = ensemble.search(query_images, gallery, k=10)    # SearchResult of fused scores, best first
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.encoders import Encoder, OpenClipEncoder, TransformersEncoder
from fashionshoot.retrieval.fusion import FUSION_METHODS, FusionMethod, fuse_scores
from fashionshoot.retrieval.heads import MetricHead
from fashionshoot.retrieval.index import ExactIndex, SearchResult, merge_topk

Backend = Literal["siglip2", "clip", "transformers", "open_clip", "histogram"]
FeatureMode = Literal["embedding", "tokens"]
Embeddings = Mapping[str, torch.Tensor]
FUSED = "fused"


# --------------------------------------------------------------------------------------------------
# Members
# --------------------------------------------------------------------------------------------------


def similarity(member: Encoder, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """``(..., Q, G)`` scores, higher is better: the member's own ``similarity`` if it has one (hyperbolic
    heads: ``-distance``), else the inner product of its unit-norm embeddings (cosine). Leading
    dimensions broadcast, as in ``queries @ gallery.mT``."""
    if queries.shape[-1] != gallery.shape[-1]:
        raise DataError(f"member {member.name!r}: query embeddings have dim {queries.shape[-1]}, "
                        f"gallery embeddings dim {gallery.shape[-1]}")
    custom = getattr(member, "similarity", None)
    return custom(queries, gallery) if callable(custom) else queries.float() @ gallery.float().mT


class BackboneFeatures:
    """A frozen backbone as a feature extractor for metric heads.

    ``embedding``: the encoder's own unit-norm image embedding (works for any :class:`Encoder`).
    ``tokens``: the pooled output concatenated with the mean and max over patch tokens of the last
    ``layers`` hidden states (0 = all, including the patch embeddings). Token statistics keep colour
    and texture evidence that a single pooled vector of a weak or off-domain backbone discards, which
    is what a head needs to tell fine-grained garments apart. Needs a transformers or OpenCLIP encoder
    (OpenCLIP exposes only its last layer's tokens).
    """

    def __init__(self, encoder: Encoder, mode: FeatureMode = "embedding", layers: int = 0) -> None:
        if mode == "tokens" and not isinstance(encoder, (TransformersEncoder, OpenClipEncoder)):
            raise ConfigError(f"features 'tokens' need a transformers or open_clip backbone, got {type(encoder).__name__}")
        self.encoder, self.mode, self.layers = encoder, mode, layers

    @property
    def spec(self) -> dict[str, Any]:
        """Provenance recorded in a head's config, so the head can be fed identically later."""
        return {"features": self.mode, "layers": self.layers}

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(len(images), F)`` float32 CPU features."""
        if self.mode == "embedding":
            return self.encoder.embed_images(images)
        images = [im.convert("RGB") for im in images]
        size = getattr(self.encoder, "batch_size", 64)
        with torch.inference_mode():
            return torch.cat([self._tokens(images[i : i + size]).float().cpu() for i in range(0, len(images), size)])

    def _tokens(self, images: list[Image.Image]) -> torch.Tensor:
        enc = self.encoder
        if isinstance(enc, OpenClipEncoder):
            pixels = torch.stack([enc.preprocess(im) for im in images]).to(enc.device)
            visual = enc.model.visual
            visual.output_tokens, previous = True, visual.output_tokens
            try:
                pooled, tokens = visual(pixels)
            finally:
                visual.output_tokens = previous
            return _token_stats(pooled, [tokens], None)
        assert isinstance(enc, TransformersEncoder)
        inputs = enc.processor(images=images, return_tensors="pt")
        inputs = {k: v.to(enc.device, enc.dtype) if v.is_floating_point() else v.to(enc.device) for k, v in inputs.items()}
        out = enc.model.get_image_features(**inputs, output_hidden_states=True)
        hidden = list(out.hidden_states)[-self.layers :] if self.layers else list(out.hidden_states)
        return _token_stats(out.pooler_output, hidden, inputs.get("pixel_attention_mask"))


def _token_stats(pooled: torch.Tensor, hidden: list[torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
    """``[pooled, mean_1, max_1, mean_2, max_2, ...]`` over valid tokens (SigLIP2 pads patches)."""
    parts = [pooled]
    for h in hidden:
        if mask is not None and h.shape[1] == mask.shape[1]:
            valid = mask.bool().unsqueeze(-1)
            parts += [(h * valid).sum(1) / valid.sum(1).clamp_min(1), h.masked_fill(~valid, float("-inf")).amax(1)]
        else:
            parts += [h.mean(1), h.amax(1)]
    return torch.cat(parts, dim=-1)


class HeadEncoder:
    """An :class:`Encoder` made of frozen backbone features followed by a trained metric head.

    ``embed_images`` returns the head's embeddings: unit-norm rows for Euclidean heads, points of the
    Poincaré ball (norm < 1/sqrt(c), *not* unit norm) for hyperbolic ones; always compare them with
    :meth:`similarity`. Heads are image-only, so ``embed_texts`` raises.
    """

    def __init__(self, features: BackboneFeatures, head: MetricHead, name: str | None = None) -> None:
        self.features, self.head = features, head.eval()
        self.name = name or head.kind
        self.metric = head.metric

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        """Head embeddings of precomputed backbone features (what training caches)."""
        if features.shape[1] != self.head.config.in_dim:
            raise DataError(f"member {self.name!r}: head expects {self.head.config.in_dim}-dim backbone features, "
                            f"got {features.shape[1]} (was it trained with another backbone or feature mode?)")
        param = next(self.head.parameters())
        with torch.inference_mode():
            return self.head(features.to(param.device, param.dtype)).float().cpu()

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed_features(self.features(images))

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise DataError(f"member {self.name!r}: metric heads embed images only")

    def similarity(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return self.head.similarity(queries, gallery)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass
class MemberConfig:
    """One ensemble member.

    ``backend`` + ``path`` name a backbone (``siglip2``/``clip``/``transformers``: a transformers dual
    encoder; ``open_clip``: an OpenCLIP folder; ``histogram``: the training-free colour baseline, no
    path). With ``head`` (a saved head folder) the member is backbone features -> head; ``path`` may
    then stay empty, and the backbone the head was trained on (recorded in its config) is used.
    """

    name: str = ""
    backend: Backend = "siglip2"
    path: str = ""
    head: str = ""
    weight: float = 1.0


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


def build_backbone(backend: Backend, path: str, device: str = "cpu", batch_size: int = 64,
                   name: str | None = None) -> Encoder:
    """An encoder for ``backend``/``path``, loaded through :mod:`fashionshoot.weights`."""
    if backend == "histogram":
        from fashionshoot.retrieval.testing_detect import HistogramEncoder

        return HistogramEncoder(name or "histogram")
    if not path:
        raise ConfigError(f"member {name!r}: backend {backend!r} needs a path")
    if backend == "open_clip":
        return OpenClipEncoder(path, device=device, batch_size=batch_size, name=name)
    return TransformersEncoder(path, device=device, batch_size=batch_size, name=name)


def build_member(config: MemberConfig, device: str = "cpu", batch_size: int = 64,
                 backbones: dict[tuple[str, str], Encoder] | None = None) -> Encoder:
    """The encoder of one member; ``backbones`` shares loaded backbones between members."""
    backbones = {} if backbones is None else backbones
    head = MetricHead.from_pretrained(config.head, device=device) if config.head else None
    backend, path = config.backend, config.path
    if head is not None and not path:
        recorded = head.config.backbone
        if not recorded.get("path") and recorded.get("backend") != "histogram":
            raise ConfigError(f"member {config.name!r}: head {config.head} records no backbone; set path")
        backend, path = recorded.get("backend", backend), recorded.get("path", "")
    key = (backend, path)
    if key not in backbones:
        backbones[key] = build_backbone(backend, path, device, batch_size, name=config.name)
    if head is None:
        return backbones[key]
    spec = head.config.backbone
    features = BackboneFeatures(backbones[key], spec.get("features", "embedding"), spec.get("layers", 0))
    return HeadEncoder(features, head, name=config.name)


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
        backbones: dict[tuple[str, str], Encoder] = {}
        members = {m.name: build_member(m, config.device, config.batch_size, backbones) for m in config.members}
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
