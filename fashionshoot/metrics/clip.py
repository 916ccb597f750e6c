"""CLIP-T (text-image) and CLIP-I (image-image) scores over a pluggable CLIP model.

Why a small backend protocol: peers score with transformers CLIP (torchmetrics' CLIPScore) or with
OpenCLIP checkpoints; both load here through :mod:`fashionshoot.weights` (never a download) and expose
the same two calls, so the metric code is written once. CLIP-T follows torchmetrics' CLIPScore exactly
(100 x mean cosine, clamped at 0; the scale is the protocol's ``clip_t_scale``). CLIP-I is the mean
cosine between a generated image and its reference image(s) — e.g. the garment, or Fashion-RAG's
retrieved garments, averaged per image — scaled by ``clip_i_scale`` (1: raw cosine, as papers report).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from fashionshoot.metrics.base import MeanScoreMetric
from fashionshoot.metrics.extractors import ExtractorInfo
from fashionshoot.metrics.images import Images, as_list, to_255
from fashionshoot.metrics.protocol import Protocol as MetricProtocol
from fashionshoot.metrics.protocol import Setting
from fashionshoot.weights import hash_weights, load_open_clip, load_pretrained, resolve_pretrained


@runtime_checkable
class ClipBackend(Protocol):
    """A CLIP-like model: unnormalised embeddings of images (float [0, 1] or uint8) and of captions."""

    extractor_info: ExtractorInfo

    def embed_images(self, images: Images) -> Tensor: ...

    def embed_texts(self, texts: Sequence[str]) -> Tensor: ...


def _features(output: Any) -> Tensor:
    """transformers 5 returns a model output from ``get_*_features``; 4.x returned the tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


class HFClip:
    """A transformers ``CLIPModel`` + ``CLIPProcessor`` folder, preprocessed as torchmetrics' CLIPScore does."""

    def __init__(self, name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from transformers import CLIPModel, CLIPProcessor

        folder = resolve_pretrained(name_or_path)
        self.model = load_pretrained(CLIPModel, folder).eval().to(device)
        self.processor = load_pretrained(CLIPProcessor, folder)
        self.device = torch.device(device)
        self.extractor_info = ExtractorInfo(f"hf-clip:{name_or_path}", folder.name, hash_weights(folder))

    @torch.no_grad()
    def embed_images(self, images: Images) -> Tensor:
        pixels = self.processor(images=[to_255(i).cpu() for i in as_list(images)], return_tensors="pt")
        return _features(self.model.get_image_features(pixels["pixel_values"].to(self.device)))

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        tokens = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        return _features(self.model.get_text_features(
            tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        ))


class OpenClip:
    """An OpenCLIP folder (``open_clip_config.json`` + weights) with its own preprocessing and tokenizer."""

    def __init__(self, name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        from torchvision.transforms.functional import to_pil_image

        self.model, self.preprocess, self.tokenizer = load_open_clip(name_or_path, device=str(device))
        self._to_pil = to_pil_image
        self.device = torch.device(device)
        folder = resolve_pretrained(name_or_path)
        self.extractor_info = ExtractorInfo(f"open-clip:{name_or_path}", folder.name, hash_weights(folder))

    @torch.no_grad()
    def embed_images(self, images: Images) -> Tensor:
        pils = [self._to_pil(to_255(i).round().byte().cpu()) for i in as_list(images)]
        batch = torch.stack([self.preprocess(p) for p in pils]).to(self.device)
        return self.model.encode_image(batch)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


def load_clip(name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ClipBackend:
    """An :class:`OpenClip` for folders with ``open_clip_config.json``, else an :class:`HFClip`."""
    folder = resolve_pretrained(name_or_path)
    cls = OpenClip if (folder / "open_clip_config.json").is_file() else HFClip
    return cls(folder, device)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two (N, D) embedding batches."""
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (a * b).sum(-1)


class CLIPTextScore(MeanScoreMetric):
    """CLIP-T: torchmetrics' CLIPScore (``clip_t_scale`` x mean cosine of image and caption, clamped at 0)."""

    metric_name = "clip_t"
    higher_is_better = True
    protocol_fields = ("clip_t_scale",)
    scale_field = "clip_t_scale"
    clamp_at_zero = True

    def __init__(self, clip: ClipBackend, protocol: MetricProtocol | None = None, setting: Setting = "paired",
                 **kwargs: Any) -> None:
        super().__init__(protocol, setting, clip.extractor_info, **kwargs)
        self.clip = clip

    def update(self, images: Images, texts: Sequence[str]) -> None:
        items = as_list(images)
        if len(items) != len(texts):
            raise ValueError(f"CLIP-T got {len(items)} images but {len(texts)} captions")
        self._accumulate(cosine(self.clip.embed_images(items), self.clip.embed_texts(texts)).float().cpu())


class CLIPImageScore(MeanScoreMetric):
    """CLIP-I: per image, the mean cosine with its reference image(s), averaged over images."""

    metric_name = "clip_i"
    higher_is_better = True
    protocol_fields = ("clip_i_scale",)
    scale_field = "clip_i_scale"

    def __init__(self, clip: ClipBackend, protocol: MetricProtocol | None = None, setting: Setting = "paired",
                 **kwargs: Any) -> None:
        super().__init__(protocol, setting, clip.extractor_info, **kwargs)
        self.clip = clip

    def update(self, images: Images, references: Images | Sequence[Images]) -> None:
        """``references``: one image per generated image, or per image a batch of several (mean cosine)."""
        items = as_list(images)
        if len(items) != len(references):
            raise ValueError(f"CLIP-I got {len(items)} images but {len(references)} references")
        groups = [as_list(r) if isinstance(r, Sequence) or r.ndim == 4 else [r] for r in references]
        flat = [ref for group in groups for ref in group]
        ref_emb = self.clip.embed_images(flat)
        gen_emb = self.clip.embed_images(items)
        owners = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
        sims = cosine(gen_emb[owners.to(gen_emb.device)], ref_emb).float().cpu()
        per_image = torch.zeros(len(groups)).index_add_(0, owners, sims) / torch.tensor([len(g) for g in groups])
        self._accumulate(per_image)
