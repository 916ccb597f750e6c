"""What a photoshoot UNet takes as input channels: ``[latents, (mask, masked-image latents), (pose)]``.

A text-to-image base (SD-1.5) has only latent channels; an inpainting base (SD-2-inpainting) adds a
regenerate-mask channel and the latents of the image with the masked region blanked; photoshoot
training may add 18 pose heatmap channels to either (:func:`~fashionshoot.models.pose.expand_conv_in`).
The layout is read from the UNet config, so a saved pipeline needs nothing beyond its ``config.json``.

An inpainting base can keep part of a given scene (``image`` + ``mask_image`` in the pipeline); with
no scene everything is regenerated (mask of ones, blank masked image), which is also how training
uses it, so an inpainting base can be fine-tuned on plain garment-lookbook pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fashionshoot.errors import ConfigError
from fashionshoot.models.pose import POSE_CHANNELS


@dataclass(frozen=True)
class UNetInputs:
    """Channel counts of each input group; ``inpaint`` is ``1 + latent`` for inpainting bases, else 0."""

    latent: int
    inpaint: int
    pose: int

    @classmethod
    def of(cls, unet_in_channels: int, latent_channels: int) -> UNetInputs:
        extra = unet_in_channels - latent_channels
        for inpaint in (0, 1 + latent_channels):
            if extra - inpaint in (0, POSE_CHANNELS):
                return cls(latent_channels, inpaint, extra - inpaint)
        raise ConfigError(
            f"UNet has {unet_in_channels} input channels; expected {latent_channels} latent channels, plus "
            f"optionally {1 + latent_channels} inpainting channels (mask + masked-image latents), plus optionally "
            f"{POSE_CHANNELS} pose channels")


def inpaint_inputs(vae: Any, latent_size: tuple[int, int], batch: int, pixels: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, 1 + C, h, w)``: the regenerate mask at latent size and the masked image's scaled latents.

    ``pixels`` ``(B, 3, H, W)`` in ``[-1, 1]`` and ``mask`` ``(B, 1, H, W)`` (1 = regenerate) go
    together; without them the whole image is regenerated (mask of ones, blank image: one VAE encode,
    shared by the batch), the convention of the diffusers inpainting pipelines.
    """
    device, dtype = vae.device, vae.dtype
    if pixels is None:
        height, width = (s * 2 ** (len(vae.config.block_out_channels) - 1) for s in latent_size)
        pixels = torch.zeros(1, 3, height, width, device=device, dtype=dtype)
        mask = torch.ones(1, 1, height, width, device=device, dtype=dtype)
    elif mask is None:
        raise ConfigError("an inpainting scene image needs its mask_image (1 = regenerate)")
    mask = (mask.to(device, dtype) >= 0.5).to(dtype)
    masked = pixels.to(device, dtype) * (1 - mask)
    latents = vae.encode(masked).latent_dist.mode() * vae.config.scaling_factor
    small_mask = F.interpolate(mask, size=latent_size)
    out = torch.cat([small_mask, latents], dim=1)
    return out.expand(batch, -1, -1, -1) if len(out) == 1 else out
