"""Build a fresh :class:`PhotoshootPipeline` from a Stable Diffusion folder and an image-encoder folder.

This is how a real run starts (``model.base`` + ``model.image_encoder`` in the training config): the
SD components are loaded through :mod:`fashionshoot.weights` (local folder or hub id, offline), the
UNet gains zero-initialised pose channels and a zero-initialised garment adapter sized for it, so
the assembled pipeline generates exactly what the base model would until training moves them.
Text-to-image (SD-1.5, 4 input channels) and inpainting (SD-2-inpainting, 9) bases both work; see
:mod:`fashionshoot.models.unet_inputs`.
"""

from __future__ import annotations

import os
from typing import Any

from fashionshoot.errors import ConfigError
from fashionshoot.models.garment_adapter import Conditioning
from fashionshoot.pipelines.photoshoot import PhotoshootPipeline
from fashionshoot.weights import load_pretrained

PathLike = str | os.PathLike[str]
#: Image-encoder config ``model_type`` -> transformers class returning patch tokens from ``pixel_values``.
_VISION_CLASSES = {
    "clip": "CLIPVisionModelWithProjection", "clip_vision_model": "CLIPVisionModelWithProjection",
    "siglip": "SiglipVisionModel", "siglip_vision_model": "SiglipVisionModel",
}


def load_image_encoder(name_or_path: PathLike) -> tuple[Any, Any]:
    """The frozen garment image encoder (vision tower only) and its image processor."""
    import transformers

    config = load_pretrained(transformers.AutoConfig, name_or_path)
    class_name = _VISION_CLASSES.get(config.model_type)
    if class_name is None:
        raise ConfigError(f"image encoder {str(name_or_path)!r} is a {config.model_type!r} model; supported: "
                          f"{sorted(_VISION_CLASSES)} (SigLIP2's variable-resolution towers need patch masks the "
                          "garment encoder does not pass)")
    encoder = load_pretrained(getattr(transformers, class_name), name_or_path)
    return encoder, load_pretrained(transformers.AutoImageProcessor, name_or_path)


def assemble_photoshoot_pipeline(base: PathLike, image_encoder: PathLike,
                                 conditioning: Conditioning = "cross_attention", pose: bool = True,
                                 **adapter_config: Any) -> PhotoshootPipeline:
    """A photoshoot pipeline around the SD model at ``base`` and the vision tower at ``image_encoder``.

    ``adapter_config`` goes to :class:`~fashionshoot.models.garment_adapter.GarmentAdapter` (e.g.
    ``num_tokens``, ``slots``). The scheduler is the base's config as DDIM.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from fashionshoot.models.garment_adapter import GarmentAdapter
    from fashionshoot.models.pose import POSE_CHANNELS, expand_conv_in

    unet = load_pretrained(UNet2DConditionModel, base, subfolder="unet")
    if pose:
        expand_conv_in(unet, POSE_CHANNELS)
    encoder, processor = load_image_encoder(image_encoder)
    adapter = GarmentAdapter.from_unet(unet, image_embed_dim=encoder.config.hidden_size,
                                       conditioning=conditioning, **adapter_config)
    return PhotoshootPipeline(
        vae=load_pretrained(AutoencoderKL, base, subfolder="vae"),
        text_encoder=load_pretrained(CLIPTextModel, base, subfolder="text_encoder"),
        tokenizer=load_pretrained(CLIPTokenizer, base, subfolder="tokenizer"),
        unet=unet,
        scheduler=load_pretrained(DDIMScheduler, base, subfolder="scheduler"),
        image_encoder=encoder,
        feature_extractor=processor,
        garment_adapter=adapter,
    )
