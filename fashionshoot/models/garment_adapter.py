"""The garment adapter: every trainable weight of garment conditioning, as one ``ModelMixin``.

``GarmentAdapter(slot_mask, image_features, reference)`` returns the ``controls`` mapping the UNet's
attention processors read (``unet(..., cross_attention_kwargs={"controls": controls})``):

* ``"garment"`` -- :class:`GarmentConditioning`: garment tokens from :class:`GarmentProjector`
  projected by per-layer ``to_k``/``to_v`` (decoupled cross-attention, IP-Adapter style). ``to_v``
  starts at zero, so an untrained adapter leaves the UNet's output unchanged; ``to_k`` starts as a
  copy of the text ``to_k`` (IP-Adapter's initialisation) so garment keys begin in a meaningful space.
* ``"reference"`` -- the :class:`~fashionshoot.models.reference_net.ReferenceBank` plus zero-initialised
  per-slot embeddings.

All weights are used inside ``forward`` (never inside a processor), so the adapter can be wrapped by
DDP / ``accelerator.prepare`` like any module, and ``save_pretrained``/``from_pretrained`` round-trip it.
Which paths exist is config (``conditioning``): ``"cross_attention"``, ``"reference"`` or ``"both"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from fashionshoot.errors import ConfigError
from fashionshoot.models.attention import (
    AttentionCall,
    AttentionFeature,
    additive_mask,
    attend,
    attention_layers,
    install_attention_features,
    is_self_attention,
)
from fashionshoot.models.garment_encoder import GarmentProjector
from fashionshoot.models.outfit import OUTFIT_SLOTS
from fashionshoot.models.reference_net import REFERENCE_KEY, ReferenceAttention, ReferenceBank

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

#: Key of the garment control in ``cross_attention_kwargs["controls"]``.
GARMENT_KEY = "garment"
Conditioning = Literal["cross_attention", "reference", "both"]
CONDITIONINGS: tuple[str, ...] = ("cross_attention", "reference", "both")
#: Garment tokens are padded with invalid (masked-out) tokens to a multiple of this many: PyTorch's CPU
#: flash attention is up to 2.5x slower when the key count is not a multiple of its 16-float AVX-512
#: vectors (24 keys cost more than 64 do). Masked keys get zero weight: the attention output is unchanged.
TOKEN_MULTIPLE = 16


@dataclass
class GarmentConditioning:
    """Per-layer garment keys/values ``(batch, tokens, inner)`` and which tokens are real ``(batch, tokens)``.

    The attention mask and the per-sample scale are derived once per object, not in every layer: a
    sample with no garment attends to all tokens (softmax over nothing is NaN) and its values are
    scaled to zero, so "no garment" means "no garment term". They are cached properties, not fields:
    FSDP2's mixed precision rebuilds every dataclass in a wrapped block's inputs with
    ``dataclasses.replace`` (to cast its tensors), which refuses fields that ``__init__`` does not take."""

    keys: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    valid: torch.Tensor
    scale: float = 1.0

    @cached_property
    def _has_garment(self) -> torch.Tensor:  # tensor ops only: no host sync on a GPU
        return self.valid.any(dim=-1)

    @cached_property
    def mask(self) -> torch.Tensor:
        """Additive ``(batch, 1, 1, tokens)`` mask; a sample with no garment keeps every token."""
        return additive_mask(self.valid | ~self._has_garment[:, None])

    @cached_property
    def row_scale(self) -> torch.Tensor:
        """``(batch, 1, 1)``: ``scale`` for samples with a garment, 0 for those without."""
        return self.scale * self._has_garment[:, None, None].float()

    def for_branches(self, keep: Sequence[bool]) -> GarmentConditioning:
        """Tile for stacked guidance branches; a ``False`` branch has no garment."""
        n = len(keep)
        return GarmentConditioning(
            {k: v.repeat(n, 1, 1) for k, v in self.keys.items()},
            {k: v.repeat(n, 1, 1) for k, v in self.values.items()},
            torch.cat([self.valid & k for k in keep]),
            self.scale,
        )


class GarmentCrossAttention(AttentionFeature):
    """Adds ``scale * attention(query, garment keys, garment values)`` to a cross-attention layer.

    The scale multiplies the values rather than the output (attention is linear in its values): there
    are a few dozen garment tokens against hundreds or thousands of queries.
    """

    def extra(self, attn: Attention, call: AttentionCall) -> torch.Tensor | None:
        cond = call.controls.get(GARMENT_KEY)
        if not isinstance(cond, GarmentConditioning) or call.layer not in cond.keys:
            return None
        dtype = call.query.dtype
        values = cond.values[call.layer].to(dtype) * cond.row_scale.to(dtype)
        return attend(attn, call.query, cond.keys[call.layer].to(dtype), values, cond.mask)


def _photoshoot_features(name: str, attn: Attention) -> tuple[AttentionFeature, ...]:
    return (ReferenceAttention(),) if is_self_attention(name, attn) else (GarmentCrossAttention(),)


def install_garment_attention(unet: UNet2DConditionModel) -> None:
    """Install the processors garment conditioning needs: reference on self-, garment on cross-attention.

    Without ``controls`` they compute exactly the base attention, so installing them is harmless.
    """
    install_attention_features(unet, _photoshoot_features)


def _module_key(layer: str) -> str:
    return layer.replace(".", "__")


class SlotEmbeddings(nn.Module):
    """A zero-initialised ``(slots, channels)`` embedding per reference layer, added to the recorded
    reference states so the generator can tell the slots apart.

    The sum happens in this module's own forward and comes out as a dict of tensors, so a sharding
    engine that gathers a module's weights only around its forward and around the tensors it returns
    (DeepSpeed ZeRO-3) has them for the backward too; read from the adapter's forward they were empty.
    Weights are named ``<layer with __ for .>`` as in the ``nn.ParameterDict`` this replaces."""

    def __init__(self, layers: Sequence[str], dims: Sequence[int], num_slots: int) -> None:
        super().__init__()
        for layer, dim in zip(layers, dims, strict=True):
            self.register_parameter(_module_key(layer), nn.Parameter(torch.zeros(num_slots, dim)))

    def forward(self, states: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weights = dict(self.named_parameters())
        return {layer: v + weights[_module_key(layer)][None, :, None, :] if _module_key(layer) in weights else v
                for layer, v in states.items()}


class GarmentAdapter(ModelMixin, ConfigMixin):
    """Trainable garment conditioning for a UNet; build with :meth:`from_unet`.

    ``layers``/``layer_dims`` name the cross-attention layers and their inner widths;
    ``reference_layers``/``reference_dims`` the self-attention layers and their hidden widths.
    """

    @register_to_config
    def __init__(
        self,
        image_embed_dim: int = 32,
        token_dim: int = 32,
        num_tokens: int = 4,
        num_heads: int = 4,
        slots: Sequence[str] = OUTFIT_SLOTS,
        layers: Sequence[str] = (),
        layer_dims: Sequence[int] = (),
        reference_layers: Sequence[str] = (),
        reference_dims: Sequence[int] = (),
        feature_layer: int = -2,
        scale: float = 1.0,
        conditioning: Conditioning = "cross_attention",
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ConfigError(f"garment adapter conditioning {conditioning!r}; expected one of {CONDITIONINGS}")
        if self.uses_cross_attention:
            self.projector = GarmentProjector(image_embed_dim, token_dim, num_tokens, num_heads, len(slots))
            self.to_k = nn.ModuleDict({_module_key(n): nn.Linear(token_dim, d, bias=False)
                                       for n, d in zip(layers, layer_dims, strict=True)})
            self.to_v = nn.ModuleDict({_module_key(n): nn.Linear(token_dim, d, bias=False)
                                       for n, d in zip(layers, layer_dims, strict=True)})
            for linear in self.to_v.values():
                nn.init.zeros_(linear.weight)
        if self.uses_reference:
            self.reference_slot_embedding = SlotEmbeddings(reference_layers, reference_dims, len(slots))

    @property
    def uses_cross_attention(self) -> bool:
        return self.config.conditioning in ("cross_attention", "both")

    @property
    def uses_reference(self) -> bool:
        return self.config.conditioning in ("reference", "both")

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, image_embed_dim: int, **config: Any) -> GarmentAdapter:
        """An adapter sized for ``unet``, with garment ``to_k`` copied from each layer's text ``to_k``."""
        layers = attention_layers(unet)
        cross = {n: a for n, a in layers.items() if not is_self_attention(n, a)}
        selfs = {n: a for n, a in layers.items() if is_self_attention(n, a)}
        adapter = cls(
            image_embed_dim=image_embed_dim, token_dim=unet.config.cross_attention_dim,
            layers=list(cross), layer_dims=[a.to_k.out_features for a in cross.values()],
            reference_layers=list(selfs), reference_dims=[a.to_k.in_features for a in selfs.values()],
            **config,
        )
        if adapter.uses_cross_attention:
            with torch.no_grad():
                for name, attn in cross.items():
                    adapter.to_k[_module_key(name)].weight.copy_(attn.to_k.weight)
        return adapter.to(unet.device)

    def forward(
        self,
        slot_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
        reference: ReferenceBank | None = None,
    ) -> dict[str, Any]:
        """Build the attention ``controls`` for a batch.

        ``slot_mask`` is ``(B, S)`` booleans; ``image_features`` ``(B, S, L, image_embed_dim)`` from
        :func:`~fashionshoot.models.garment_encoder.encode_garment_pixels` (zeros where empty), needed
        for cross-attention conditioning; ``reference`` a bank from
        :func:`~fashionshoot.models.reference_net.write_reference`, needed for reference conditioning.
        """
        slot_mask = slot_mask.bool()
        if slot_mask.shape[1] != len(self.config.slots):
            raise ConfigError(f"slot mask has {slot_mask.shape[1]} slots; adapter slots: {list(self.config.slots)}")
        controls: dict[str, Any] = {}
        if self.uses_cross_attention:
            if image_features is None:
                raise ConfigError("this garment adapter uses cross-attention conditioning: pass image_features")
            tokens, valid = self.projector(image_features.to(self.dtype), slot_mask)
            pad = -tokens.shape[1] % TOKEN_MULTIPLE
            tokens, valid = F.pad(tokens, (0, 0, 0, pad)), F.pad(valid, (0, pad), value=False)
            controls[GARMENT_KEY] = GarmentConditioning(
                {n: self.to_k[_module_key(n)](tokens) for n in self.config.layers},
                {n: self.to_v[_module_key(n)](tokens) for n in self.config.layers},
                valid,
                self.config.scale,
            )
        if self.uses_reference:
            if reference is None:
                raise ConfigError("this garment adapter uses reference conditioning: pass a reference bank")
            controls[REFERENCE_KEY] = ReferenceBank(self.reference_slot_embedding(reference.states), reference.slot_mask)
        return controls
