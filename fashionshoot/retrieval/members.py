"""Retrieval members: the config of one member, the encoder it loads, and how it scores.

A member is any :class:`~fashionshoot.retrieval.encoders.Encoder`: a zero-shot backbone (SigLIP2,
CLIP, OpenCLIP, the colour-histogram baseline) or a trained metric head on frozen backbone features
(:class:`HeadEncoder`). :func:`similarity` is the one place a member's geometry is applied (cosine,
or a head's own ``similarity`` such as the negative Poincaré distance); the ensemble, the pair
builder and the evaluation all score through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from PIL import Image

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.encoders import Encoder, HistogramEncoder, OpenClipEncoder, TransformersEncoder
from fashionshoot.retrieval.heads import MetricHead

Backend = Literal["siglip2", "clip", "transformers", "open_clip", "histogram"]
FeatureMode = Literal["embedding", "tokens"]


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
    :meth:`similarity`. Heads are image-only: ``embed_texts`` raises and ``embeds_texts`` is False.
    """

    embeds_texts = False

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


def build_backbone(backend: Backend, path: str, device: str = "cpu", batch_size: int = 64,
                   name: str | None = None) -> Encoder:
    """An encoder for ``backend``/``path``, loaded through :mod:`fashionshoot.weights`."""
    if backend == "histogram":
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


def build_members(configs: Sequence[MemberConfig], device: str = "cpu", batch_size: int = 64) -> dict[str, Encoder]:
    """Name -> encoder for every configured member, members on the same backbone sharing one copy."""
    names = [m.name for m in configs]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"members: names must be unique and non-empty, got {names}")
    backbones: dict[tuple[str, str], Encoder] = {}
    return {m.name: build_member(m, device, batch_size, backbones) for m in configs}
