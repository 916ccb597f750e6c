from __future__ import annotations

import numpy as np
import pytest

from fashionshoot.data.masks import DRESSCODE_LABELS as L
from fashionshoot.data.masks import dilate, dresscode_inpaint_mask
from fashionshoot.errors import DataError

H, W = 256, 192  # scale 0.5 vs. the 512 reference: arm band 22.5 px, neck margin 10 px, dilation 10 px


def _person(top: str = "upper_clothes") -> tuple[np.ndarray, np.ndarray]:
    """A blocky person: hair, head reaching below the shoulders, a top, arms with hands, pants, shoes."""
    lab = np.zeros((H, W), np.uint8)
    lab[0:10, 80:112] = L["hair"]
    lab[10:76, 80:112] = L["head"]
    lab[60:150, 60:132] = L[top]
    lab[60:170, 40:60] = L["right_arm"]
    lab[150:230, 60:132] = L["pants"]
    lab[240:256, 60:90] = L["left_shoe"]
    kp = np.zeros((18, 3), np.float32)
    kp[1] = (96, 60, 1)  # neck
    kp[2] = (60, 60, 1)  # r_shoulder
    kp[3] = (50, 100, 1)  # r_elbow
    kp[4] = (50, 140, 1)  # r_wrist
    kp[5] = (132, 60, 1)  # l_shoulder
    kp[6] = (142, 100, 1)  # l_elbow
    kp[7] = (142, 140, 0)  # l_wrist missing
    return lab, kp


def test_dilate_matches_square_kernel_iterations():
    m = np.zeros((41, 41), bool)
    m[20, 20] = True
    out = dilate(m)  # 5x5 x 5 iterations -> radius 10
    ys, xs = np.nonzero(out)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (10, 30, 10, 30)
    assert out.sum() == 21 * 21


def test_upper_body_mask_covers_garment_arms_neck_and_keeps_fixed():
    lab, kp = _person()
    m = dresscode_inpaint_mask(lab, kp, "upper_body")
    assert m.shape == (H, W) and m.dtype == bool
    assert m[lab == L["upper_clothes"]].all()
    assert not m[lab == L["pants"]].any()  # other half's garment stays
    assert not m[lab == L["hair"]].any() and not m[lab == L["left_shoe"]].any()
    assert not m[10:45, 80:112].any()  # face above the shoulder line (60 - 10 margin)
    assert m[55:76, 80:112].all()  # neck below it
    assert m[120, 45:56].all()  # forearm inside the arm band
    assert not m[152:170, 40:60].any()  # hand: arm label outside the band is fixed, even near the top
    assert m[145, 138] and not m[145, 150]  # dilation reaches ~10 px into background, not 18
    assert not m[130, 142]  # left wrist missing: the band stops at the elbow


def test_neck_skin_far_below_the_shoulders_is_repainted():
    lab, kp = _person()
    lab[60:110, 85:108] = L["head"]  # deep V-neck: exposed skin labelled head, out of dilation reach
    m = dresscode_inpaint_mask(lab, kp, "upper_body")
    assert m[88, 96]
    assert not m[10:45, 85:108].any()


def test_arm_band_follows_present_wrist():
    lab, kp = _person()
    kp[7, 2] = 1.0
    assert dresscode_inpaint_mask(lab, kp, "upper_body")[130, 142]


def test_lower_body_mask_ignores_arms_and_neck():
    lab, kp = _person()
    m = dresscode_inpaint_mask(lab, kp, "lower_body")
    assert m[lab == L["pants"]].all()
    assert not m[lab == L["upper_clothes"]].any()
    assert not m[lab == L["right_arm"]].any()
    assert not m[55:76, 80:112].any()
    assert m[235, 100]  # dilated below the pants hem


def test_dresses_mask_includes_dress_and_legs():
    lab, kp = _person(top="dress")
    lab[150:230, 60:132] = L["left_leg"]
    m = dresscode_inpaint_mask(lab, kp, "dresses")
    assert m[lab == L["dress"]].all() and m[lab == L["left_leg"]].all()
    assert m[120, 50]


def test_bounding_box_variant_fills_box_minus_fixed():
    lab, kp = _person()
    m = dresscode_inpaint_mask(lab, kp, "upper_body")
    box = dresscode_inpaint_mask(lab, kp, "upper_body", variant="bounding_box")
    assert (box | m).sum() == box.sum()  # mask within box
    assert box[145, 150] and not m[145, 150]  # background inside the box
    assert not box[155, 100]  # pants inside the box rows stay fixed
    assert not box[lab == L["hair"]].any()


def test_empty_person_gives_empty_mask():
    m = dresscode_inpaint_mask(np.zeros((64, 48), np.uint8), np.zeros((18, 3)), "upper_body", "bounding_box")
    assert not m.any()


def test_bad_inputs_raise_data_error():
    lab, kp = _person()
    with pytest.raises(DataError, match="2-D"):
        dresscode_inpaint_mask(np.zeros((4, 4, 3)), kp, "upper_body")
    with pytest.raises(DataError, match="18"):
        dresscode_inpaint_mask(lab, kp[:17], "upper_body")
    with pytest.raises(DataError, match="category"):
        dresscode_inpaint_mask(lab, kp, "shoes")
