"""Tiny random models, built from configs and written in the real on-disk formats.

No weights can be downloaded in CI, and mocking a model would test nothing. Instead each factory here
builds a few-hundred-kilobyte model of the real class from a config and writes it with the real
``save_pretrained`` (or open_clip's ``open_clip_config.json`` layout), so tests and the embedded
default config load it back through exactly the production path: :mod:`fashionshoot.weights`.

The CLIP tokenizer is the real 49,408-token BPE vocabulary that ships inside the open_clip package,
so prompts tokenize exactly as they would with an SD-1.5 tokenizer.
"""

from __future__ import annotations

import functools
import gzip
import json
import string
from pathlib import Path
from typing import Any

#: Width of the tiny text encoders; also the UNet's cross-attention width.
TINY_TEXT_DIM = 32
CLIP_MAX_LENGTH = 77
CLIP_VOCAB_SIZE = 49408


@functools.cache
def _bpe_merges() -> tuple[str, ...]:
    """The merge rules of CLIP's BPE, read from the copy that open_clip bundles."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(default_bpe(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    return tuple(lines[1 : 49152 - 256 - 2 + 1])


@functools.cache
def _clip_vocab_json() -> str:
    from open_clip.tokenizer import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    vocab = byte_tokens + [t + "</w>" for t in byte_tokens]
    vocab += ["".join(m.split()) for m in _bpe_merges()]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({tok: i for i, tok in enumerate(vocab)})


def write_clip_tokenizer(save_dir: str | Path) -> Path:
    """Write a full CLIP tokenizer (vocab.json, merges.txt, tokenizer_config.json) to ``save_dir``.

    The vocabulary is rebuilt exactly as CLIP builds it: 256 byte tokens, their ``</w>`` forms, one
    token per merge, then the two special tokens.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(_clip_vocab_json())
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(_bpe_merges()) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (save_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return save_dir


def tiny_clip_text_config(**overrides: Any):
    from transformers import CLIPTextConfig

    kwargs = dict(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=TINY_TEXT_DIM,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    kwargs.update(overrides)
    return CLIPTextConfig(**kwargs)


def tiny_clip_vision_config(image_size: int = 32, **overrides: Any):
    from transformers import CLIPVisionConfig

    kwargs = dict(
        image_size=image_size, patch_size=8, hidden_size=TINY_TEXT_DIM, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, projection_dim=TINY_TEXT_DIM,
    )
    kwargs.update(overrides)
    return CLIPVisionConfig(**kwargs)


def tiny_unet(in_channels: int = 4, cross_attention_dim: int = TINY_TEXT_DIM, sample_size: int = 8, **overrides: Any):
    """A two-level UNet2DConditionModel (~1 M parameters). ``in_channels=9`` gives the inpainting layout."""
    from diffusers import UNet2DConditionModel

    kwargs = dict(
        sample_size=sample_size, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=8, norm_num_groups=8,
    )
    kwargs.update(overrides)
    return UNet2DConditionModel(**kwargs)


def tiny_vae(**overrides: Any):
    """An AutoencoderKL with 4 latent channels and a spatial factor of 2 (two blocks, one downsampling)."""
    from diffusers import AutoencoderKL

    kwargs = dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8,
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def save_tiny_stable_diffusion(save_dir: str | Path, inpainting: bool = False, seed: int = 0) -> Path:
    """Write a complete tiny Stable Diffusion pipeline folder (diffusers layout, ``model_index.json``)."""
    import torch
    from diffusers import DDPMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    tokenizer_dir = write_clip_tokenizer(save_dir / "tokenizer")
    pipeline_cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    pipe = pipeline_cls(
        unet=tiny_unet(in_channels=9 if inpainting else 4),
        vae=tiny_vae(),
        text_encoder=CLIPTextModel(tiny_clip_text_config()),
        tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)),
        scheduler=DDPMScheduler(
            num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(save_dir))
    return save_dir


def save_tiny_clip(save_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny transformers ``CLIPModel`` with its tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=tiny_clip_text_config().to_dict(),
        vision_config=tiny_clip_vision_config(image_size).to_dict(),
        projection_dim=TINY_TEXT_DIM,
    )
    CLIPModel(config).save_pretrained(str(save_dir))
    write_clip_tokenizer(save_dir)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size=image_size).save_pretrained(str(save_dir))
    return save_dir


def siglip2_char_tokenizer():
    """A real ``Siglip2Tokenizer`` with a character-level vocabulary (plus Gemma-style byte fallback).

    SigLIP2 checkpoints ship a 256k-token Gemma vocabulary that cannot be downloaded here; a
    character vocabulary exercises the same class, files and padding behaviour at a tiny size.
    """
    from transformers import Siglip2Tokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + list(string.printable[:94])
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return Siglip2Tokenizer(vocab=vocab, merges=[], model_max_length=64)


def save_tiny_siglip2(save_dir: str | Path, patch_size: int = 8, max_patches: int = 16, seed: int = 0) -> Path:
    """Write a tiny transformers ``Siglip2Model`` with its image processor and tokenizer."""
    import torch
    from transformers import Siglip2Config, Siglip2ImageProcessor, Siglip2Model

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    tokenizer = siglip2_char_tokenizer()
    common = dict(hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = Siglip2Config(
        text_config=dict(common, vocab_size=len(tokenizer), max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=1),
        vision_config=dict(common, patch_size=patch_size, num_patches=max_patches),
    )
    Siglip2Model(config).save_pretrained(str(save_dir))
    tokenizer.save_pretrained(str(save_dir))
    Siglip2ImageProcessor(patch_size=patch_size, max_num_patches=max_patches).save_pretrained(str(save_dir))
    return save_dir


def save_tiny_open_clip(save_dir: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny OpenCLIP model in open_clip's own folder layout (``local-dir:`` loadable)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": TINY_TEXT_DIM,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": CLIP_MAX_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": 32, "heads": 4,
                     "layers": 2},
    }
    preprocess_cfg = {"image_size": image_size, "mean": [0.48145466, 0.4578275, 0.40821073],
                      "std": [0.26862954, 0.26130258, 0.27577711]}
    (save_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(save_dir / "open_clip_model.safetensors"))
    return save_dir
