"""Tiny real detectors for testing the retrieval pipeline (no downloads).

:func:`save_tiny_owlv2` writes a few-hundred-kilobyte random ``Owlv2ForObjectDetection`` with its
processor and the real CLIP tokenizer; :func:`save_tiny_grounding_dino` writes a random
``GroundingDinoForObjectDetection`` (tiny ResNet backbone built from its config, no timm, tiny BERT
text tower) with its processor and a small WordPiece vocabulary. Both detector branches are thus
exercised through the production path (``save_pretrained`` -> :mod:`fashionshoot.weights` ->
``from_pretrained``). The colour-histogram baseline encoder lives in
:mod:`fashionshoot.retrieval.encoders` (:class:`HistogramEncoder`).
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

#: Words of the tiny BERT vocabulary (any other lowercase word still tokenizes, letter by letter).
GROUNDING_WORDS = ("a", "photo", "of", "the", "skirt", "top", "dress", "shirt", "trousers", "jacket", "coat",
                   "bag", "shoes")


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


def write_bert_vocab(save_dir: str | Path) -> Path:
    """A small uncased WordPiece ``vocab.txt`` laid out like ``bert-base-uncased`` where it matters.

    Grounding DINO hard-codes the ids of ``[CLS]`` (101), ``[SEP]`` (102), ``.`` (1012) and ``?``
    (1029) to split the prompt into phrases, so those sit at their BERT positions: ``[PAD]``, 99
    unused slots, ``[UNK] [CLS] [SEP] [MASK]``, unused slots up to 999, then ASCII punctuation, digits
    and lowercase letters in code-point order (as in BERT), their ``##`` continuations, and
    :data:`GROUNDING_WORDS`.
    """
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(99, 99 + 999 - len(vocab))]
    vocab += [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab += list(GROUNDING_WORDS)
    assert (vocab.index("[CLS]"), vocab.index("[SEP]"), vocab.index("."), vocab.index("?")) == (101, 102, 1012, 1029)
    path = Path(save_dir) / "vocab.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(vocab) + "\n")
    return path


def save_tiny_grounding_dino(save_dir: str | Path, seed: int = 0, num_queries: int = 16) -> Path:
    """Write a tiny Grounding DINO detector (~130k parameters) with processor and BERT tokenizer.

    The backbone is a 4-stage ResNet from its transformers config (``use_timm_backbone=False``, no
    pretrained weights); one encoder and two decoder layers (transformers cannot tie the box heads of
    a single-layer decoder); images are resized to a 64-pixel short side.
    """
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        ResNetConfig,
    )

    save_dir = Path(save_dir)
    vocab = write_bert_vocab(save_dir)
    tokenizer = BertTokenizer(str(vocab), do_lower_case=True, model_max_length=64)
    torch.manual_seed(seed)
    config = GroundingDinoConfig(
        backbone_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                                     layer_type="basic", out_features=["stage2", "stage3", "stage4"]),
        use_timm_backbone=False, use_pretrained_backbone=False,
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=4, decoder_attention_heads=4, num_queries=num_queries, num_feature_levels=3,
        encoder_n_points=2, decoder_n_points=2, max_text_len=64,
    )
    GroundingDinoForObjectDetection(config).eval().save_pretrained(str(save_dir))
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(save_dir))
    return save_dir
