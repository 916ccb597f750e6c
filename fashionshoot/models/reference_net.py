"""Reference-network conditioning: the generator's self-attention also attends to the garments' own
self-attention tokens (IDM-VTON's GarmentNet / Animate-Anyone's ReferenceNet).

No second UNet class and no patched forward: a *write* pass runs a UNet (the generator itself, or
a copy used as reference net) on the garment latents with a :class:`ReferenceWrite` control, and
:class:`ReferenceAttention` records each self-attention layer's input. The resulting
:class:`ReferenceBank` is then passed to the generator, where the same feature concatenates those
tokens to its self-attention keys/values (projected by the generator's own ``to_k``/``to_v``), with
empty slots masked out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fashionshoot.models.attention import CONTROLS_KEY, AttentionCall, AttentionFeature
from fashionshoot.models.garment_encoder import scatter_slots

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

#: Key of the reference control in ``cross_attention_kwargs["controls"]``.
REFERENCE_KEY = "reference"


class ReferenceWrite:
    """Control for the write pass: collects ``layer -> (garments, tokens, channels)``.

    A plain class on purpose: FSDP2's mixed precision rebuilds the dataclasses and dicts in a wrapped
    block's inputs to cast their tensors, so states written into such a copy would be lost."""

    def __init__(self) -> None:
        self.states: dict[str, torch.Tensor] = {}


@dataclass
class ReferenceBank:
    """Recorded self-attention inputs per layer as ``(batch, slots, tokens, channels)``, plus the slot mask."""

    states: dict[str, torch.Tensor]
    slot_mask: torch.Tensor

    def tokens(self, layer: str) -> torch.Tensor:
        """``(batch, slots * tokens, channels)``, slot-major."""
        states = self.states[layer]
        return states.reshape(states.shape[0], -1, states.shape[-1])

    def valid(self, layer: str) -> torch.Tensor:
        return self.slot_mask.repeat_interleave(self.states[layer].shape[2], dim=1)

    def for_branches(self, keep: Sequence[bool]) -> ReferenceBank:
        """Tile for stacked guidance branches; a ``False`` branch sees every slot as empty."""
        mask = torch.cat([self.slot_mask & k for k in keep])
        return ReferenceBank({k: v.repeat(len(keep), 1, 1, 1) for k, v in self.states.items()}, mask)


class ReferenceAttention(AttentionFeature):
    """Self-attention feature: records layer inputs under :class:`ReferenceWrite`, reads a :class:`ReferenceBank`."""

    def route(self, attn: Attention, call: AttentionCall) -> None:
        control = call.controls.get(REFERENCE_KEY)
        if isinstance(control, ReferenceWrite):
            control.states[call.layer] = call.hidden_states

    def project(self, attn: Attention, call: AttentionCall) -> None:
        control = call.controls.get(REFERENCE_KEY)
        if isinstance(control, ReferenceBank) and call.layer in control.states:
            tokens = control.tokens(call.layer).to(call.hidden_states.dtype)
            call.append_kv(attn.to_k(tokens), attn.to_v(tokens), control.valid(call.layer))


def write_reference(
    unet: UNet2DConditionModel,
    latents: torch.Tensor,
    slot_mask: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    timestep: int | torch.Tensor = 0,
) -> ReferenceBank:
    """Run ``unet`` once on the present garments' latents ``(B, S, C, h, w)`` and record a bank.

    Extra UNet input channels (pose, inpainting mask) are zero for garments. ``timestep`` 0 treats
    the garment as a clean image, as IDM-VTON's GarmentNet does, so one write serves every denoising
    step. ``encoder_hidden_states`` is ``(1 | garments, tokens, dim)`` (usually the empty prompt).
    Gradients flow through the write pass, so it can be trained.
    """
    present = latents[slot_mask]
    recorder = ReferenceWrite()
    if len(present):
        extra = unet.config.in_channels - present.shape[1]
        if extra > 0:
            present = torch.cat([present, present.new_zeros(len(present), extra, *present.shape[2:])], dim=1)
        context = encoder_hidden_states.expand(len(present), -1, -1)
        unet(present, timestep, context, cross_attention_kwargs={CONTROLS_KEY: {REFERENCE_KEY: recorder}})
    return ReferenceBank({k: scatter_slots(v, slot_mask) for k, v in recorder.states.items()}, slot_mask)
