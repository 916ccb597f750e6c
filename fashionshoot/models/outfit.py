"""Outfits as a fixed, ordered set of garment slots (Zalando's "six articles in semantic order").

A model sees garment ``i`` always in slot ``i`` with that slot's embedding, so the order is part of
the trained weights: it lives here, once, and every caller goes through :func:`arrange_outfit`. An
empty slot is ``None`` and is masked out of attention downstream (never a grey image that attends).
Pure Python on purpose: data loaders and CLIs use it without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

from fashionshoot.errors import DataError

T = TypeVar("T")

#: The default slot order. Changing it (or its length) changes what a trained adapter means.
OUTFIT_SLOTS: tuple[str, ...] = ("top", "outerwear", "bottom", "dress", "shoes", "bag")

#: One outfit: slot name -> garment (or ``None``), or garments listed in slot order.
Outfit = Mapping[str, T | None] | Sequence[T | None]


def _slot_error(name: object, slots: Sequence[str]) -> DataError:
    return DataError(f"unknown garment slot {name!r}; valid slots, in order: {', '.join(slots)}")


def arrange_outfit(garments: Outfit[T], slots: Sequence[str] = OUTFIT_SLOTS) -> list[T | None]:
    """Return one entry per slot, in slot order, ``None`` where the slot is empty.

    A mapping is keyed by slot name (unknown names are an error naming the valid slots); a sequence
    lists garments positionally in slot order and may be shorter than ``slots``.
    """
    if isinstance(garments, Mapping):
        unknown = [name for name in garments if name not in slots]
        if unknown:
            raise _slot_error(unknown[0], slots)
        return [garments.get(name) for name in slots]
    items = list(garments)
    if len(items) > len(slots):
        raise DataError(f"outfit has {len(items)} garments but only {len(slots)} slots: {', '.join(slots)}")
    return items + [None] * (len(slots) - len(items))


def is_outfit_batch(garments: object) -> bool:
    """True when ``garments`` is a list of outfits rather than one outfit.

    One outfit is a mapping or a flat sequence of garments/``None``; a batch is a sequence whose
    entries are themselves mappings or sequences.
    """
    if isinstance(garments, Mapping) or not isinstance(garments, Sequence) or isinstance(garments, str):
        return False
    return any(isinstance(g, (Mapping, list, tuple)) for g in garments)


def swap_garments(outfit: Outfit[T], replacements: Mapping[str, T | None],
                  slots: Sequence[str] = OUTFIT_SLOTS) -> list[T | None]:
    """Outfit transfer: ``outfit`` with the slots named in ``replacements`` replaced (``None`` empties)."""
    arranged = arrange_outfit(outfit, slots)
    for name, garment in replacements.items():
        if name not in slots:
            raise _slot_error(name, slots)
        arranged[list(slots).index(name)] = garment
    return arranged


def slot_mask(outfits: Sequence[Sequence[object | None]]) -> list[list[bool]]:
    """``True`` where an arranged outfit has a garment; the mask every attention path uses."""
    return [[g is not None for g in outfit] for outfit in outfits]
