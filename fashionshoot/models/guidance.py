"""Separate guidance for garment and text: condition dropout in training, two-scale CFG at sampling.

Training drops the garment, the text, or both (IP-Adapter's 5 % / 5 % / 5 % recipe), so one model
learns ``eps(∅,∅)``, ``eps(g,∅)`` and ``eps(g,t)``. Sampling then combines them as InstructPix2Pix
does, with the garment as the "image" condition::

    eps = eps(∅,∅) + s_garment * (eps(g,∅) - eps(∅,∅)) + s_text * (eps(g,t) - eps(g,∅))

where ``∅`` text is the negative prompt (empty by default) and ``∅`` garment means every slot masked.
Pose is a structural input and stays in every branch. With both scales 1 this is exactly
``eps(g,t)`` (one branch is run); with equal scales it is ordinary CFG between ``eps(∅,∅)`` and
``eps(g,t)`` (two branches); otherwise three branches are run.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch

from fashionshoot.errors import ConfigError

Branch = Literal["uncond", "garment", "full"]
#: Whether each branch sees the garment and the (positive) text.
BRANCH_CONDITIONS: dict[str, tuple[bool, bool]] = {
    "uncond": (False, False), "garment": (True, False), "full": (True, True),
}


def guidance_branches(scale_text: float, scale_garment: float) -> tuple[Branch, ...]:
    """The fewest branches the formula needs for these scales, in batch order."""
    if scale_text == 1.0 and scale_garment == 1.0:
        return ("full",)
    if scale_text == scale_garment:
        return ("uncond", "full")
    return ("uncond", "garment", "full")


def combine_guidance(eps: Mapping[str, torch.Tensor], scale_text: float, scale_garment: float) -> torch.Tensor:
    """Apply the two-scale formula to the branch predictions :func:`guidance_branches` asked for."""
    if "garment" not in eps:
        if "uncond" not in eps:
            return eps["full"]
        return eps["uncond"] + scale_text * (eps["full"] - eps["uncond"])
    return (eps["uncond"] + scale_garment * (eps["garment"] - eps["uncond"])
            + scale_text * (eps["full"] - eps["garment"]))


def condition_dropout(
    batch: Mapping[str, Any],
    p_garment: float = 0.05,
    p_text: float = 0.05,
    p_both: float = 0.05,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Drop garment, text or both per sample, with exclusive probabilities (one uniform draw each).

    The draws come from ``generator``, or are given as ``uniform`` ``(B,)`` in ``[0, 1)`` (training
    passes per-sample draws, see :mod:`fashionshoot.training.randomness`).

    ``batch`` needs ``slot_mask`` ``(B, S)`` booleans and ``prompts`` (``B`` strings). A dropped
    garment clears its row of ``slot_mask`` (every slot then masked out of attention, as at
    sampling); a dropped text becomes ``""``. Other keys pass through. ``dropped_garment`` and
    ``dropped_text`` ``(B,)`` are added for logging.
    """
    if min(p_garment, p_text, p_both) < 0 or p_garment + p_text + p_both > 1:
        raise ConfigError(f"dropout probabilities must be >= 0 and sum to <= 1, got {p_garment}, {p_text}, {p_both}")
    slot_mask = batch["slot_mask"].bool()
    prompts = list(batch["prompts"])
    if len(prompts) != len(slot_mask):
        raise ConfigError(f"{len(prompts)} prompts for a batch of {len(slot_mask)} outfits")
    u = uniform if uniform is not None else torch.rand(len(slot_mask), generator=generator,
                                                       device=generator.device if generator else "cpu")
    u = u.to(slot_mask.device)
    both = (u >= p_garment + p_text) & (u < p_garment + p_text + p_both)
    drop_garment = (u < p_garment) | both
    drop_text = ((u >= p_garment) & (u < p_garment + p_text)) | both
    out = dict(batch)
    out["slot_mask"] = slot_mask & ~drop_garment[:, None]
    out["prompts"] = ["" if d else p for p, d in zip(prompts, drop_text.tolist(), strict=True)]
    out["dropped_garment"], out["dropped_text"] = drop_garment, drop_text
    return out
