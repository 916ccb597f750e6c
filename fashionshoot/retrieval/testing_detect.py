"""A tiny real detector for testing the retrieval pipeline (no downloads).

:func:`save_tiny_owlv2` writes a few-hundred-kilobyte random ``Owlv2ForObjectDetection`` with its
processor and the real CLIP tokenizer, so the detector adapter is exercised through the production
path (``save_pretrained`` -> :mod:`fashionshoot.weights` -> ``from_pretrained``). The colour-histogram
baseline encoder lives in :mod:`fashionshoot.retrieval.encoders` (:class:`HistogramEncoder`).
"""

from __future__ import annotations

from pathlib import Path

import torch


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
