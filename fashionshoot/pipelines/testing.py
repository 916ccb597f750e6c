"""Tiny random :class:`~fashionshoot.pipelines.photoshoot.PhotoshootPipeline` folders for tests and demos.

Built from the same tiny configs as :mod:`fashionshoot.testing` and written with the real
``save_pretrained``, so loading one back exercises exactly the production path.
"""

from __future__ import annotations

from pathlib import Path

from fashionshoot.models.garment_adapter import Conditioning

#: Side of the tiny image encoder's input and of the default generated images.
TINY_IMAGE_SIZE = 32


def save_tiny_photoshoot_pipeline(
    save_dir: str | Path,
    conditioning: Conditioning = "both",
    pose: bool = True,
    randomize_zero_init: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny pipeline folder: 2-level UNet (+18 pose channels), tiny VAE, CLIP text and vision towers.

    ``randomize_zero_init`` replaces the zero-initialised pose weights, garment ``to_v`` and reference
    slot embeddings with small random values, as after training: otherwise garments and pose would
    have no effect and tests of those paths would prove nothing. Pass ``False`` for the exact
    "fresh adapter" state a training run starts from.
    """
    import torch
    from diffusers import DDIMScheduler
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

    from fashionshoot import testing
    from fashionshoot.models.garment_adapter import GarmentAdapter
    from fashionshoot.models.pose import POSE_CHANNELS, expand_conv_in
    from fashionshoot.pipelines.photoshoot import PhotoshootPipeline

    save_dir = Path(save_dir)
    torch.manual_seed(seed)
    unet = testing.tiny_unet(sample_size=TINY_IMAGE_SIZE // 2)
    if pose:
        expand_conv_in(unet, POSE_CHANNELS)
    vision_config = testing.tiny_clip_vision_config(image_size=TINY_IMAGE_SIZE)
    adapter = GarmentAdapter.from_unet(unet, image_embed_dim=vision_config.hidden_size, conditioning=conditioning)
    if randomize_zero_init:
        with torch.no_grad():
            if pose:
                unet.conv_in.weight[:, -POSE_CHANNELS:].normal_(std=0.2)
            for name, param in adapter.named_parameters():
                if name.startswith(("to_v.", "reference_slot_embedding.")):
                    param.normal_(std=0.5)
    pipe = PhotoshootPipeline(
        vae=testing.tiny_vae(),
        text_encoder=CLIPTextModel(testing.tiny_clip_text_config()),
        tokenizer=CLIPTokenizer.from_pretrained(str(testing.write_clip_tokenizer(save_dir / "tokenizer"))),
        unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                steps_offset=1),
        image_encoder=CLIPVisionModelWithProjection(vision_config),
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size=TINY_IMAGE_SIZE),
        garment_adapter=adapter,
    )
    pipe.save_pretrained(str(save_dir))
    return save_dir


def saved_weights(pipeline_dir: str | Path, parts: tuple[str, ...] = ("unet", "garment_adapter")) -> dict:
    """``{"<part>.<tensor name>": tensor}`` read from a saved pipeline folder's safetensors files, for
    comparing what two runs wrote without loading the models."""
    from safetensors.torch import load_file

    out = {}
    for part in parts:
        for file in sorted((Path(pipeline_dir) / part).glob("*.safetensors")):
            out.update({f"{part}.{k}": v for k, v in load_file(file).items()})
    return out
