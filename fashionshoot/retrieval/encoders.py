"""Image/text encoders for retrieval: one small interface, several backends.

Retrieval code (gallery search, fusion, the pair builder, the garment-fidelity metric) only needs
"turn these images / texts into L2-normalised vectors". :class:`Encoder` is that contract; the
backends wrap SigLIP2 and CLIP from transformers and OpenCLIP models, all loaded through
:mod:`fashionshoot.weights` so nothing is ever downloaded behind the user's back, plus the
training-free colour-histogram baseline (:class:`HistogramEncoder`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fashionshoot import weights
from fashionshoot.errors import DataError


@runtime_checkable
class Encoder(Protocol):
    """Anything that embeds images (and optionally texts) into L2-normalised float vectors."""

    name: str

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Return a float32 CPU tensor of shape ``(len(images), dim)`` with unit-norm rows."""
        ...

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Return a float32 CPU tensor of shape ``(len(texts), dim)`` with unit-norm rows."""
        ...


def _features(output: Any) -> torch.Tensor:
    """transformers 5 may return an output object from ``get_*_features``; take its pooled vector."""
    return getattr(output, "pooler_output", output)


class BatchedEncoder(ABC):
    """Shared batching, device placement, no-grad and normalisation for the concrete backends."""

    def __init__(self, name: str, device: str | torch.device = "cpu", batch_size: int = 64,
                 dtype: torch.dtype = torch.float32) -> None:
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.dtype = dtype

    @abstractmethod
    def _encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    @abstractmethod
    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor: ...

    def _batched(self, items: Sequence[Any], encode) -> torch.Tensor:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(items), self.batch_size):
                out = encode(items[start : start + self.batch_size])
                chunks.append(F.normalize(out.float(), dim=-1).cpu())
        if not chunks:
            raise ValueError(f"{self.name}: nothing to embed (empty input)")
        return torch.cat(chunks)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self._batched([im.convert("RGB") for im in images], self._encode_images)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._batched(list(texts), self._encode_texts)


class TransformersEncoder(BatchedEncoder):
    """A transformers dual encoder with ``get_image_features``/``get_text_features`` (SigLIP2, CLIP).

    ``model_cls`` defaults to ``AutoModel``; the processor and tokenizer come from the same folder.
    Text is padded to ``max_length`` as SigLIP was trained (CLIP is indifferent).
    """

    def __init__(self, name_or_path: str, model_cls: Any = None, device: str | torch.device = "cpu",
                 batch_size: int = 64, dtype: torch.dtype = torch.float32, name: str | None = None) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        super().__init__(name or str(name_or_path), device, batch_size, dtype)
        self.model = weights.load_pretrained(model_cls or AutoModel, name_or_path, dtype=dtype)
        self.model.to(self.device).eval()
        self.processor = weights.load_pretrained(AutoImageProcessor, name_or_path)
        self.tokenizer = weights.load_pretrained(AutoTokenizer, name_or_path)

    def _encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        inputs = self.processor(images=list(images), return_tensors="pt")
        inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device)
                  for k, v in inputs.items()}
        return _features(self.model.get_image_features(**inputs))

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        max_length = min(self.tokenizer.model_max_length, 512)
        inputs = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**inputs))


class OpenClipEncoder(BatchedEncoder):
    """An OpenCLIP model folder (``open_clip_config.json`` + weights), e.g. a Marqo-FashionSigLIP copy."""

    def __init__(self, name_or_path: str, device: str | torch.device = "cpu", batch_size: int = 64,
                 name: str | None = None) -> None:
        super().__init__(name or str(name_or_path), device, batch_size)
        self.model, self.preprocess, self.tokenizer = weights.load_open_clip(name_or_path, device=str(self.device))

    def _encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels)

    def _encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))


class HistogramEncoder:
    """Colour-histogram embeddings: ``bins`` levels per RGB channel over non-background pixels.

    A deterministic, training-free baseline (backend ``histogram``): the square-rooted colour
    histogram of an image's foreground. Random tiny models retrieve at chance level; this encoder
    gives pipeline tests and the default synthetic benchmark a baseline with predictable answers.

    Pixels brighter than ``background`` in every channel (studio white) are ignored, so a product
    shot and a crop of the same garment share a histogram. Texts embed as the histogram of the named
    colours in ``colours`` (word -> RGB); a text naming none embeds as the uniform histogram.
    """

    def __init__(self, name: str = "histogram", bins: int = 6, background: int = 235, size: int = 64,
                 colours: Mapping[str, tuple[int, int, int]] | None = None) -> None:
        if colours is None:
            from fashionshoot.data.synthetic.vocab import COLOURS as colours
        self.name, self.bins, self.background, self.size = name, bins, background, size
        self.colours = dict(colours)

    @property
    def dim(self) -> int:
        return self.bins ** 3

    def _histogram(self, pixels: np.ndarray) -> torch.Tensor:
        q = pixels.astype(np.int64) * self.bins // 256
        index = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]
        counts = np.bincount(index, minlength=self.dim).astype(np.float32)
        if counts.sum() == 0:
            counts[:] = 1.0
        return torch.nn.functional.normalize(torch.from_numpy(np.sqrt(counts)), dim=0)

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        if not images:
            raise DataError(f"{self.name}: nothing to embed (empty input)")
        rows = []
        for im in images:
            pixels = np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.int64).reshape(-1, 3)
            rows.append(self._histogram(pixels[~(pixels > self.background).all(1)]))
        return torch.stack(rows)

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        if not texts:
            raise DataError(f"{self.name}: nothing to embed (empty input)")
        rows = []
        for text in texts:
            lowered = f" {text.lower()} "
            named = [rgb for word, rgb in self.colours.items() if f" {word} " in lowered]
            rows.append(self._histogram(np.array(named, dtype=np.int64).reshape(-1, 3)))
        return torch.stack(rows)
