"""Garment localisation in lookbook images: an open-vocabulary detector interface, crops, view pooling.

A lookbook photo shows a whole person (often several garments) in a scene; comparing a product shot
with the whole photo lets background and the other garments dominate the similarity. The pipeline
therefore asks a detector for boxes of the garment's *category* ("a photo of a skirt"), crops them,
and scores the garment against every view. The full image is always kept as one more view, so a
detector miss degrades to whole-image retrieval instead of losing the lookbook, and per-lookbook
scores are pooled over views (max: the best-matching crop wins; mean: all views vote).

:class:`TransformersDetector` wraps OWL-ViT / OWLv2 and Grounding DINO from transformers; anything
with the :class:`Detector` ``detect`` method can replace it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from PIL import Image

from fashionshoot import weights
from fashionshoot.errors import DataError

Box = tuple[float, float, float, float]
Pooling = Literal["max", "mean"]


@dataclass(frozen=True)
class Detection:
    """One detected region: ``box`` is ``(x1, y1, x2, y2)`` in the input image's pixels."""

    box: Box
    score: float
    label: str


@runtime_checkable
class Detector(Protocol):
    """Open-vocabulary detection: for each image, the regions matching any of the text ``queries``.

    ``label`` of each detection is the query string that matched; ``name`` identifies the detector and
    its settings (it keys the detection cache, so change it whenever the boxes would change).
    """

    name: str

    def detect(self, images: Sequence[Image.Image], queries: Sequence[str]) -> list[list[Detection]]: ...


def clip_box(box: Sequence[float], size: tuple[int, int]) -> Box:
    """Clamp ``box`` to an image of PIL ``size`` ``(width, height)``."""
    width, height = size
    x1, y1, x2, y2 = (float(v) for v in box)
    return (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
            min(max(x2, 0.0), width), min(max(y2, 0.0), height))


def full_box(size: tuple[int, int]) -> Box:
    return (0.0, 0.0, float(size[0]), float(size[1]))


def pad_box(box: Box, padding: float, size: tuple[int, int]) -> Box:
    """Grow ``box`` by ``padding`` times its width/height on each side (context around the garment)."""
    x1, y1, x2, y2 = box
    dx, dy = (x2 - x1) * padding, (y2 - y1) * padding
    return clip_box((x1 - dx, y1 - dy, x2 + dx, y2 + dy), size)


def view_boxes(detections: Sequence[Detection], size: tuple[int, int], *, max_crops: int = 3,
               padding: float = 0.05, min_side: float = 8.0, include_full: bool = True) -> list[Box]:
    """Boxes to embed for one lookbook and one category: the best ``max_crops`` padded detections
    (tiny ones dropped), then the full frame. With no usable detection only the full frame remains."""
    usable = [d for d in sorted(detections, key=lambda d: -d.score)
              if min(d.box[2] - d.box[0], d.box[3] - d.box[1]) >= min_side]
    boxes = [pad_box(d.box, padding, size) for d in usable[:max_crops]]
    if include_full or not boxes:
        boxes.append(full_box(size))
    return boxes


def crop(image: Image.Image, box: Box) -> Image.Image:
    """The pixels of ``box`` (rounded outwards); the full frame returns ``image`` itself."""
    if box == full_box(image.size):
        return image
    x1, y1 = math.floor(box[0]), math.floor(box[1])
    return image.crop((x1, y1, max(x1 + 1, math.ceil(box[2])), max(y1 + 1, math.ceil(box[3]))))


def pool_views(scores: torch.Tensor, owner: torch.Tensor, num_owners: int,
               how: Pooling = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """Pool ``(Q, V)`` view scores into ``(Q, num_owners)`` lookbook scores.

    ``owner[v]`` is the lookbook of view ``v``. Returns the pooled scores and, per query and lookbook,
    the index of its best view (its crop box is what the pair record stores). A lookbook without views
    gets ``-inf`` and view index ``-1``.
    """
    if scores.ndim != 2 or owner.shape != (scores.shape[1],):
        raise DataError(f"pool_views: scores {tuple(scores.shape)} do not match owners {tuple(owner.shape)}")
    if how not in ("max", "mean"):
        raise DataError(f"pooling {how!r}: expected 'max' or 'mean'")
    q, v = scores.shape
    index = owner.to(scores.device).expand(q, v)
    empty = torch.full((q, num_owners), float("-inf"), dtype=scores.dtype, device=scores.device)
    best_score = empty.scatter_reduce(1, index, scores, "amax", include_self=True)
    is_best = scores == best_score.gather(1, index)
    positions = torch.arange(v, device=scores.device).expand(q, v)
    candidates = torch.where(is_best, positions, torch.full_like(positions, v))
    best_view = torch.full((q, num_owners), v, dtype=torch.long, device=scores.device)
    best_view = best_view.scatter_reduce(1, index, candidates, "amin", include_self=True)
    best_view[best_view == v] = -1
    if how == "max":
        return best_score, best_view
    pooled = empty.scatter_reduce(1, index, scores, "mean", include_self=False)
    return pooled, best_view


class TransformersDetector:
    """OWL-ViT / OWLv2 / Grounding DINO from a local folder (or hub id resolved offline).

    OWLv2 pads every image to a square before predicting, so its boxes are relative to that square:
    they are converted with the padded side as target size and then clipped to the real image, which
    is the usual source of "boxes shifted on non-square images" bugs. Grounding DINO's boxes are
    relative to the image itself. ``threshold`` is the minimum box score; ``text_threshold`` applies
    to Grounding DINO only, where a box belongs to the query whose prompt tokens score highest and
    must reach both thresholds (see :meth:`_grounded`).
    """

    def __init__(self, name_or_path: str, threshold: float = 0.1, text_threshold: float = 0.25,
                 nms_iou: float = 0.5, device: str | torch.device = "cpu", batch_size: int = 8,
                 name: str | None = None) -> None:
        from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

        self.model = weights.load_pretrained(AutoModelForZeroShotObjectDetection, name_or_path)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.processor = weights.load_pretrained(AutoProcessor, name_or_path)
        self.model_type = self.model.config.model_type
        if self.model_type not in ("owlv2", "owlvit", "grounding-dino"):
            raise DataError(f"{name_or_path}: detector type {self.model_type!r} is not one of owlv2, owlvit, "
                            "grounding-dino")
        self.threshold, self.text_threshold, self.nms_iou = threshold, text_threshold, nms_iou
        self.batch_size = batch_size
        self.name = name or f"{name_or_path}|t={threshold}|tt={text_threshold}|nms={nms_iou}"

    def detect(self, images: Sequence[Image.Image], queries: Sequence[str]) -> list[list[Detection]]:
        if not queries:
            return [[] for _ in images]
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._detect_batch([im.convert("RGB") for im in images[start : start + self.batch_size]],
                                          list(queries)))
        return out

    def _detect_batch(self, images: list[Image.Image], queries: list[str]) -> list[list[Detection]]:
        texts = [queries] * len(images)
        inputs = self.processor(text=texts, images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            outputs = self.model(**inputs)
        if self.model_type == "owlv2":
            targets = [(max(im.size), max(im.size)) for im in images]
        else:
            targets = [(im.height, im.width) for im in images]
        if self.model_type == "grounding-dino":
            return self._grounded(outputs, inputs["input_ids"], targets, images, queries)
        results = self.processor.post_process_grounded_object_detection(
            outputs, threshold=self.threshold, target_sizes=targets, text_labels=texts)
        out = []
        for r, im in zip(results, images, strict=True):
            labels = [_match_query(str(t), queries) for t in r["text_labels"]]
            keep = [i for i, label in enumerate(labels) if label is not None]
            out.append(self._to_detections(r["boxes"][keep], r["scores"][keep],
                                           torch.tensor([queries.index(labels[i]) for i in keep], dtype=torch.long),
                                           im.size, queries))
        return out

    def _grounded(self, outputs, input_ids: torch.Tensor, targets: list[tuple[int, int]],
                  images: list[Image.Image], queries: list[str]) -> list[list[Detection]]:
        """Grounding DINO: each box scores every prompt *token*; a box's query is the one whose tokens
        score highest (its score: that maximum, kept above ``threshold`` and ``text_threshold``).

        The processor's own labels decode the tokens above ``text_threshold`` into text, which for
        several queries in one prompt often spans two of them or only their shared words ("a photo
        of"); reading the per-query token spans avoids that guesswork. Falls back to matching the
        decoded text when the prompt does not split into one span per query.
        """
        spans = _query_spans(input_ids, self.processor.tokenizer, len(queries), outputs.logits.shape[-1])
        # Boxes come from the processor (its conversion to pixels), all of them, in query order.
        results = self.processor.post_process_grounded_object_detection(
            outputs, input_ids, threshold=float("-inf"), text_threshold=self.text_threshold, target_sizes=targets)
        out = []
        for b, (r, im) in enumerate(zip(results, images, strict=True)):
            if spans[b] is None:
                labels = [_match_query(str(t), queries) for t in r["text_labels"]]
                per_query = torch.full((len(labels), len(queries)), float("-inf"))
                for i, label in enumerate(labels):
                    if label is not None:
                        per_query[i, queries.index(label)] = float(r["scores"][i])
            else:
                probs = outputs.logits[b].float().sigmoid().cpu()
                per_query = torch.stack([probs[:, span].amax(dim=1) for span in spans[b]], dim=1)
            scores, labels = per_query.max(dim=1)
            keep = (scores > self.threshold) & (scores > self.text_threshold)
            out.append(self._to_detections(r["boxes"][keep], scores[keep], labels[keep], im.size, queries))
        return out

    def _to_detections(self, boxes: torch.Tensor, scores: torch.Tensor, groups: torch.Tensor,
                       size: tuple[int, int], queries: list[str]) -> list[Detection]:
        """Per-query NMS over boxes in pixels; ``groups[i]`` is the index of box ``i``'s query."""
        from torchvision.ops import batched_nms

        if not len(boxes):
            return []
        boxes, scores, groups = boxes.float().cpu(), scores.float().cpu(), groups.cpu()
        kept = batched_nms(boxes, scores, groups, self.nms_iou)
        return [Detection(clip_box(boxes[i].tolist(), size), float(scores[i]), queries[int(groups[i])])
                for i in kept.tolist()]


def _query_spans(input_ids: torch.Tensor, tokenizer, num_queries: int, max_len: int) -> list[list[list[int]] | None]:
    """Per prompt, the token positions of each query (``[CLS] q1 . q2 . [SEP]``), or None when the
    prompt does not split into exactly ``num_queries`` spans (e.g. a query containing a full stop, or
    a prompt cut at the model's ``max_text_len``)."""
    separators = {tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id,
                  tokenizer.convert_tokens_to_ids(".")}
    out: list[list[list[int]] | None] = []
    for ids in input_ids[:, :max_len].tolist():
        spans: list[list[int]] = []
        current: list[int] = []
        for position, token in enumerate(ids):
            if token in separators:
                if current:
                    spans.append(current)
                current = []
            else:
                current.append(position)
        if current:
            spans.append(current)
        out.append(spans if len(spans) == num_queries else None)
    return out


def _match_query(text: str, queries: list[str]) -> str | None:
    """The query a predicted label belongs to. OWL returns the query itself; Grounding DINO returns
    the matched phrase, which may be a part of a query (or span two): take the query containing it."""
    if text in queries:
        return text
    text = text.strip().lower()
    return next((q for q in queries if text and (text in q.lower() or q.lower() in text)), None)
