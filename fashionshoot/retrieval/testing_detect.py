"""Small real components for testing and CPU baselines of the retrieval pipeline (no downloads).

- :func:`save_tiny_owlv2` writes a few-hundred-kilobyte random ``Owlv2ForObjectDetection`` with its
  processor and the real CLIP tokenizer, so the detector adapter is exercised through the production
  path (``save_pretrained`` -> :mod:`fashionshoot.weights` -> ``from_pretrained``).
- :class:`HistogramEncoder` is a deterministic, training-free :class:`~fashionshoot.retrieval.encoders.Encoder`:
  the square-rooted colour histogram of an image's foreground, and for texts the histogram of the
  colours they name. Random tiny models retrieve at chance level; this encoder gives pipeline tests
  and the default synthetic benchmark a baseline whose right answers are predictable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fashionshoot.errors import DataError


def save_tiny_owlv2(save_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny OWLv2 detector (2-layer towers, 8-pixel patches) with processor and tokenizer."""
    from transformers import (
        CLIPTokenizer,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessor,
        Owlv2Processor,
    )

    from fashionshoot.testing import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, write_clip_tokenizer

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Owlv2Config(
        text_config=dict(tower, vocab_size=CLIP_VOCAB_SIZE, max_position_embeddings=CLIP_MAX_LENGTH,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0),
        vision_config=dict(tower, image_size=image_size, patch_size=8),
        projection_dim=32,
    )
    Owlv2ForObjectDetection(config).eval().save_pretrained(str(save_dir))
    tokenizer = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(save_dir)))
    processor = Owlv2Processor(
        image_processor=Owlv2ImageProcessor(size={"height": image_size, "width": image_size}), tokenizer=tokenizer)
    processor.save_pretrained(str(save_dir))
    return save_dir


class HistogramEncoder:
    """Colour-histogram embeddings: ``bins`` levels per RGB channel over non-background pixels.

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
