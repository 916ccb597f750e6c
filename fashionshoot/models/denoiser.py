"""The training-time forward: reference write + garment adapter + UNet as one ``nn.Module``.

Distributed training wants every trainable weight used inside a single ``forward`` of the wrapped
module (DDP prepares its gradient reducer per forward; two separate UNet calls before one backward
break that). :class:`PhotoshootDenoiser` is that module; its parts stay the saved components
(``unet``, ``garment_adapter``), so nothing new needs saving.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fashionshoot.errors import ConfigError
from fashionshoot.models.attention import CONTROLS_KEY
from fashionshoot.models.garment_adapter import GarmentAdapter, install_garment_attention
from fashionshoot.models.reference_net import write_reference

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel


class PhotoshootDenoiser(nn.Module):
    """Predict the UNet target for noisy latents given text, garments and (optionally) pose."""

    def __init__(self, unet: UNet2DConditionModel, garment_adapter: GarmentAdapter) -> None:
        super().__init__()
        self.unet = unet
        self.garment_adapter = garment_adapter
        install_garment_attention(unet)

    @property
    def _no_split_modules(self) -> list[str]:
        """The UNet's blocks: accelerate's FSDP ``TRANSFORMER_BASED_WRAP`` shards these as units of their own
        when no layer classes are named (it reads this attribute of the prepared module)."""
        return list(self.unet._no_split_modules or [])

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor | int,
        encoder_hidden_states: torch.Tensor,
        slot_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        garment_latents: torch.Tensor | None = None,
        reference_context: torch.Tensor | None = None,
        pose: torch.Tensor | None = None,
        inpaint: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``image_features`` ``(B, S, L, D)`` feed cross-attention conditioning; ``garment_latents``
        ``(B, S, C, h, w)`` and ``reference_context`` (usually the empty-prompt embedding) feed
        reference conditioning; ``inpaint`` ``(B, 1 + C, h, w)`` (mask + masked-image latents, inpainting
        UNets only) and ``pose`` ``(B, 18, h, w)`` are appended to the UNet input channels in that order."""
        bank = None
        if self.garment_adapter.uses_reference:
            if garment_latents is None or reference_context is None:
                raise ConfigError("reference conditioning needs garment_latents and reference_context")
            bank = write_reference(self.unet, garment_latents, slot_mask.bool(), reference_context)
        controls = self.garment_adapter(slot_mask, image_features, bank)
        model_input = torch.cat([x for x in (noisy_latents, inpaint, pose) if x is not None], dim=1)
        return self.unet(model_input, timesteps, encoder_hidden_states,
                         cross_attention_kwargs={CONTROLS_KEY: controls}).sample
