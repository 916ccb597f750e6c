"""One attention processor with hook points, so new conditioning is a small feature, not a new UNet.

Every attention layer of the UNet gets a :class:`FashionAttnProcessor` (installed with the public
``unet.set_attn_processor``). It computes exactly what diffusers' ``AttnProcessor2_0`` computes, and
calls its :class:`AttentionFeature` s at three points:

``route``    choose which tokens keys/values come from (``call.context``) or record the layer input
             -- Fashion-RAG's per-level prompts, reference writing;
``project``  edit the projected ``query`` / ``key`` / ``value`` / mask -- reference K/V concatenation,
             FashionR2R's Q/K store-and-inject;
``extra``    return a term added to the attention output -- decoupled garment cross-attention.

Features hold no weights and no state: everything per call arrives in ``cross_attention_kwargs``
under one key, ``controls`` (a mapping each feature reads its own entry from). Weights live in
``ModelMixin`` modules (e.g. the garment adapter) that produce those controls, so processors never
become part of the UNet's ``state_dict`` and a UNet with no controls behaves exactly like the base.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import Attention

#: The single ``cross_attention_kwargs`` key the processors read.
CONTROLS_KEY = "controls"


@dataclass
class AttentionCall:
    """The state of one attention call as the features see and edit it.

    Token tensors are ``(batch, tokens, channels)``; ``query``/``key``/``value`` are projected but
    not yet split into heads. ``mask`` is additive, broadcastable to ``(batch, heads, queries, keys)``.
    """

    layer: str
    is_cross: bool
    hidden_states: torch.Tensor
    context: torch.Tensor
    controls: Mapping[str, Any]
    query: torch.Tensor | None = None
    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def append_kv(self, key: torch.Tensor, value: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Concatenate extra keys/values; ``valid`` ``(batch, extra)`` masks some of them out."""
        assert self.key is not None and self.value is not None
        if valid is not None or self.mask is not None:
            batch, keys = self.key.shape[:2]
            old = self.mask if self.mask is not None else self.key.new_zeros(batch, 1, 1, keys)
            new = additive_mask(valid if valid is not None else key.new_ones(key.shape[:2], dtype=torch.bool))
            new = new.to(old.dtype).expand(*old.shape[:-1], key.shape[1])
            self.mask = torch.cat([old, new], dim=-1)
        self.key = torch.cat([self.key, key], dim=1)
        self.value = torch.cat([self.value, value], dim=1)


class AttentionFeature:
    """A conditioning behaviour plugged into :class:`FashionAttnProcessor`; override what you need."""

    def route(self, attn: Attention, call: AttentionCall) -> None:
        """Before projection: may replace ``call.context`` or record ``call.hidden_states``."""

    def project(self, attn: Attention, call: AttentionCall) -> None:
        """After projection: may edit ``call.query`` / ``key`` / ``value`` / ``mask``."""

    def extra(self, attn: Attention, call: AttentionCall) -> torch.Tensor | None:
        """After attention: a ``(batch, queries, inner)`` term added before the output projection."""
        return None


def additive_mask(valid: torch.Tensor) -> torch.Tensor:
    """``(batch, keys)`` booleans -> additive ``(batch, 1, 1, keys)`` mask (0 keep, -inf drop)."""
    zeros = torch.zeros(valid.shape, dtype=torch.float32, device=valid.device)
    return zeros.masked_fill(~valid, float("-inf"))[:, None, None, :]


def attend(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head scaled dot-product attention with ``attn``'s heads and Q/K norms (as diffusers does)."""
    batch = query.shape[0]
    head_dim = key.shape[-1] // attn.heads

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(batch, -1, attn.heads, head_dim).transpose(1, 2)

    q, k, v = heads(query), heads(key), heads(value)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if mask is not None:
        mask = mask.to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)


class FashionAttnProcessor:
    """diffusers attention processor (``AttnProcessor2_0`` maths) that runs :class:`AttentionFeature` s."""

    def __init__(self, layer: str, features: Sequence[AttentionFeature] = ()) -> None:
        self.layer = layer
        self.features = tuple(features)

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        controls: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        is_cross = encoder_hidden_states is not None
        context = hidden_states
        if encoder_hidden_states is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        call = AttentionCall(self.layer, is_cross, hidden_states, context, controls or {})
        for feature in self.features:
            feature.route(attn, call)

        batch = call.hidden_states.shape[0]
        if attention_mask is not None:
            mask = attn.prepare_attention_mask(attention_mask, call.context.shape[1], batch)
            call.mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        call.query = attn.to_q(call.hidden_states)
        call.key = attn.to_k(call.context)
        call.value = attn.to_v(call.context)
        for feature in self.features:
            feature.project(attn, call)

        out = attend(attn, call.query, call.key, call.value, call.mask)
        for feature in self.features:
            term = feature.extra(attn, call)
            if term is not None:
                out = out + term

        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_layers(unet: UNet2DConditionModel) -> dict[str, Attention]:
    """The UNet's attention modules by layer name (the processor key without ``.processor``)."""
    return {key.removesuffix(".processor"): unet.get_submodule(key.removesuffix(".processor"))
            for key in unet.attn_processors}


def install_attention_features(
    unet: UNet2DConditionModel,
    select: Callable[[str, Attention], Sequence[AttentionFeature]],
) -> None:
    """Give every attention layer a :class:`FashionAttnProcessor` with the features ``select`` picks."""
    unet.set_attn_processor({
        f"{name}.processor": FashionAttnProcessor(name, select(name, attn))
        for name, attn in attention_layers(unet).items()
    })


def is_self_attention(name: str, attn: Attention) -> bool:
    """UNet transformer blocks name self-attention ``attn1`` and text cross-attention ``attn2``."""
    return not attn.is_cross_attention and name.endswith("attn1")
