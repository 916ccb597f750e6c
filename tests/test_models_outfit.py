"""Outfit slots and the garment/text guidance contract (light: no diffusers)."""

from __future__ import annotations

import pytest
import torch

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.models.guidance import combine_guidance, condition_dropout, guidance_branches
from fashionshoot.models.outfit import OUTFIT_SLOTS, arrange_outfit, is_outfit_batch, slot_mask, swap_garments


def test_slots_are_six_in_fixed_semantic_order():
    assert OUTFIT_SLOTS == ("top", "outerwear", "bottom", "dress", "shoes", "bag")


def test_arrange_outfit_orders_by_slot_not_by_mapping_order():
    assert arrange_outfit({"shoes": "S", "top": "T"}) == arrange_outfit({"top": "T", "shoes": "S"})
    assert arrange_outfit({"shoes": "S", "top": "T"}) == ["T", None, None, None, "S", None]
    assert arrange_outfit(["T", None, "B"]) == ["T", None, "B", None, None, None]
    assert arrange_outfit({"top": "T", "bag": None}) == arrange_outfit({"top": "T"})


def test_unknown_slot_names_it_and_the_valid_slots():
    with pytest.raises(DataError, match=r"'hat'.*top, outerwear, bottom, dress, shoes, bag"):
        arrange_outfit({"top": "T", "hat": "H"})
    with pytest.raises(DataError, match="'hat'"):
        swap_garments({"top": "T"}, {"hat": "H"})
    with pytest.raises(DataError, match="7 garments"):
        arrange_outfit(list("abcdefg"))


def test_swap_garments_and_masks():
    swapped = swap_garments({"top": "T", "bottom": "B"}, {"bottom": "J", "top": None})
    assert swapped == [None, None, "J", None, None, None]
    assert slot_mask([swapped]) == [[False, False, True, False, False, False]]


def test_outfit_batch_detection():
    assert not is_outfit_batch({"top": "T"})
    assert not is_outfit_batch(["T", None])
    assert is_outfit_batch([{"top": "T"}, ["T"]])


def test_condition_dropout_rates_are_exclusive_and_reproducible():
    n = 20000
    batch = {"slot_mask": torch.ones(n, 6, dtype=torch.bool), "prompts": ["x"] * n, "other": 1}
    out = condition_dropout(batch, 0.1, 0.2, 0.05, torch.Generator().manual_seed(0))
    dg, dt = out["dropped_garment"], out["dropped_text"]
    assert abs((dg & ~dt).float().mean() - 0.1) < 0.01
    assert abs((dt & ~dg).float().mean() - 0.2) < 0.01
    assert abs((dg & dt).float().mean() - 0.05) < 0.01
    assert torch.equal(out["slot_mask"].any(1), ~dg)
    assert [p == "" for p in out["prompts"]] == dt.tolist()
    assert out["other"] == 1
    again = condition_dropout(batch, 0.1, 0.2, 0.05, torch.Generator().manual_seed(0))
    assert torch.equal(again["dropped_text"], dt)
    with pytest.raises(ConfigError):
        condition_dropout(batch, 0.5, 0.5, 0.5)


def test_two_scale_guidance_formula():
    e = {k: torch.randn(2, 4, 3, 3) for k in ("uncond", "garment", "full")}
    assert torch.allclose(combine_guidance(e, 1.0, 1.0), e["full"], atol=1e-6)
    expected = e["uncond"] + 3 * (e["garment"] - e["uncond"]) + 5 * (e["full"] - e["garment"])
    assert torch.allclose(combine_guidance(e, 5.0, 3.0), expected)
    # Equal scales reduce to ordinary CFG, so two branches are enough.
    two = {k: e[k] for k in guidance_branches(4.0, 4.0)}
    assert torch.allclose(combine_guidance(two, 4.0, 4.0), combine_guidance(e, 4.0, 4.0), atol=1e-5)
    assert guidance_branches(1.0, 1.0) == ("full",)
    assert guidance_branches(5.0, 3.0) == ("uncond", "garment", "full")


def test_packages_import_without_diffusers_or_transformers():
    import json
    import subprocess
    import sys

    code = ("import fashionshoot.models, fashionshoot.pipelines, fashionshoot.models.outfit, "
            "fashionshoot.models.guidance, fashionshoot.pipelines.cli\n"
            "import json, sys; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = {m.split(".")[0] for m in json.loads(out.stdout.strip().splitlines()[-1])}
    assert not loaded & {"diffusers", "transformers", "open_clip"}
