"""Conditioning modules for the photo-shoot generator.

Garments enter the UNet through attention processors (:mod:`~fashionshoot.models.attention`):
decoupled garment cross-attention fed by :class:`~fashionshoot.models.garment_adapter.GarmentAdapter`
(IP-Adapter style) and/or reference self-attention written by a reference pass
(:mod:`~fashionshoot.models.reference_net`). Pose enters as zero-initialised extra input channels
(:mod:`~fashionshoot.models.pose`), outfits as fixed semantic slots (:mod:`~fashionshoot.models.outfit`),
and :mod:`~fashionshoot.models.guidance` holds the condition-dropout / two-scale guidance contract.

Nothing is re-exported here so ``import fashionshoot.models`` stays free of diffusers and transformers.
"""
