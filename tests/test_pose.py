from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fashionshoot.data.pose import (
    BODY25,
    COCO18,
    MPII16,
    as_keypoints,
    convert_keypoints,
    default_sigma,
    keypoint_heatmaps,
    render_skeleton,
    rescale_keypoints,
)
from fashionshoot.errors import DataError


def _distinct(n: int) -> np.ndarray:
    """Joint j at (10 + j, 100 + 2j) with confidence 0.5 + j/100: every joint is identifiable."""
    j = np.arange(n, dtype=np.float32)
    return np.stack([10 + j, 100 + 2 * j, 0.5 + j / 100], axis=1)


def _joint(kp: np.ndarray, fmt, name: str) -> np.ndarray:
    return kp[fmt.joints.index(name)]


def test_formats_have_expected_sizes_and_valid_edges():
    for fmt, n in ((COCO18, 18), (BODY25, 25), (MPII16, 16)):
        assert fmt.num_joints == n
        assert all(0 <= a < n and 0 <= b < n for a, b in fmt.edges)
    assert COCO18.joints[2] == "r_shoulder" and COCO18.joints[11] == "l_hip" and COCO18.joints[17] == "l_ear"
    assert MPII16.joints[9] == "head_top" and MPII16.joints[12] == "r_shoulder"


def test_body25_to_coco18_skips_mid_hip():
    src = _distinct(25)
    out = convert_keypoints(src, "body25", "coco18")
    assert out.shape == (18, 3)
    np.testing.assert_array_equal(out[:8], src[:8])  # nose .. l_wrist copied
    np.testing.assert_array_equal(out[8], src[9])  # r_hip <- BODY_25 RHip, not MidHip
    np.testing.assert_array_equal(out[13], src[14])  # l_ankle
    np.testing.assert_array_equal(out[17], src[18])  # l_ear
    # every named COCO joint matches the same-named BODY_25 joint
    for name in COCO18.joints:
        np.testing.assert_array_equal(_joint(out, COCO18, name), _joint(src, BODY25, name))


def test_mpii16_to_coco18_maps_limbs_and_zeroes_face():
    src = _distinct(16)
    out = convert_keypoints(src, "mpii16", "coco18")
    np.testing.assert_array_equal(out[1], src[7])  # neck <- thorax
    np.testing.assert_array_equal(out[2], src[12])  # r_shoulder
    np.testing.assert_array_equal(out[4], src[10])  # r_wrist
    np.testing.assert_array_equal(out[10], src[0])  # r_ankle
    np.testing.assert_array_equal(out[13], src[5])  # l_ankle
    for j in (0, 14, 15, 16, 17):  # nose, eyes, ears: not in MPII
        assert out[j, 2] == 0


def test_coco18_to_mpii16_pelvis_is_hip_midpoint_and_head_missing():
    src = _distinct(18)
    out = convert_keypoints(src, "coco18", "mpii16")
    np.testing.assert_allclose(out[6, :2], (src[8, :2] + src[11, :2]) / 2)
    assert out[6, 2] == pytest.approx(min(src[8, 2], src[11, 2]))
    np.testing.assert_array_equal(out[12], src[2])  # r_shoulder
    np.testing.assert_array_equal(out[15], src[7])  # l_wrist
    assert out[8, 2] == 0 and out[9, 2] == 0
    src[11, 2] = 0  # one hip missing -> pelvis missing
    assert convert_keypoints(src, "coco18", "mpii16")[6, 2] == 0


def test_missing_source_joint_stays_missing():
    src = _distinct(25)
    src[9, 2] = 0  # BODY_25 RHip
    assert convert_keypoints(src, "body25", "coco18")[8, 2] == 0


def test_unknown_conversion_and_wrong_joint_count_raise():
    with pytest.raises(DataError, match="body25"):
        convert_keypoints(_distinct(18), "coco18", "body25")
    with pytest.raises(DataError, match="25"):
        convert_keypoints(_distinct(18), "body25", "coco18")


@pytest.mark.parametrize("bad", [np.zeros((18, 5)), np.zeros((2, 3, 3)), [[1, 2], [3]], "abc", np.zeros(7)])
def test_malformed_arrays_raise_data_error(bad):
    with pytest.raises(DataError, match="kp.json"):
        as_keypoints(bad, where="kp.json")


def test_as_keypoints_accepts_openpose_flat_and_dresscode_rows():
    flat = as_keypoints(list(range(75)), "body25")
    assert flat.shape == (25, 3) and flat[1].tolist() == [3, 4, 5]
    dc = as_keypoints([[1, 2, 0.5, 7]] * 18, "coco18")
    assert dc.shape == (18, 3) and dc[0].tolist() == [1, 2, 0.5]
    assert as_keypoints([[1, 2]])[0, 2] == 1.0


def test_rescale_from_dresscode_frame():
    kp = np.array([[192.0, 256.0, 1.0], [384.0, 512.0, 0.7]])
    out = rescale_keypoints(kp, (384, 512), (768, 1024))
    np.testing.assert_allclose(out, [[384, 512, 1.0], [768, 1024, 0.7]])
    out = rescale_keypoints(kp, (384, 512), (96, 256))  # non-uniform
    np.testing.assert_allclose(out[0, :2], [48, 128])


@pytest.mark.parametrize("size", [(64, 48), (128, 96), (512, 384), (37, 53)])
def test_heatmap_peak_lands_on_keypoint(size):
    h, w = size
    kp = np.array([[0.3 * w, 0.6 * h, 1.0], [w - 1, 0, 0.9]], np.float32)
    kp[0, :2] = np.round(kp[0, :2])
    maps = keypoint_heatmaps(kp, size)
    assert maps.shape == (2, h, w) and maps.dtype == torch.float32
    for c in range(2):
        y, x = divmod(int(maps[c].argmax()), w)
        assert (x, y) == (int(kp[c, 0]), int(kp[c, 1]))
        assert maps[c].max() == pytest.approx(1.0)


def test_heatmap_sigma_scales_with_resolution():
    kp = np.array([[40.0, 40.0, 1.0]])
    small = keypoint_heatmaps(kp, (128, 96))
    big = keypoint_heatmaps(kp * [2, 2, 1], (256, 192))
    assert default_sigma(512) == 9.0
    # the value at the same relative offset is the same at both resolutions
    assert small[0, 40, 40 + 3].item() == pytest.approx(big[0, 80, 80 + 6].item(), rel=1e-5)
    assert small[0, 40, 43].item() == pytest.approx(np.exp(-9 / default_sigma(128) ** 2), rel=1e-5)


def test_missing_keypoint_gives_zero_channel_and_outside_is_harmless():
    kp = np.array([[10, 10, 0.0], [-500, 20, 1.0], [30, 5000, 1.0], [1e6, -1e6, 1.0]], np.float32)
    maps = keypoint_heatmaps(kp, (64, 48))
    assert torch.isfinite(maps).all()
    assert maps[0].abs().sum() == 0
    assert maps[1:].max() < 1e-6
    near = keypoint_heatmaps(np.array([[-0.5, 20, 1.0]]), (64, 48))
    assert 0.5 < near[0, 20, 0] < 1  # a joint just outside still reaches the border


def test_render_skeleton_draws_limbs_only_between_present_joints():
    kp = np.zeros((18, 3), np.float32)
    kp[1] = (50, 20, 1)  # neck
    kp[2] = (30, 20, 1)  # r_shoulder
    kp[3] = (30, 60, 1)  # r_elbow
    kp[8] = (40, 90, 0)  # r_hip missing
    img = np.asarray(render_skeleton(kp, (100, 120)))
    assert img.shape == (120, 100, 3)
    assert img[40, 30].any()  # on the r_shoulder-r_elbow limb
    assert img[20, 40].any()  # on the neck-r_shoulder limb
    assert not img[55:85, 45].any()  # nothing towards the missing hip
    assert not img[100:, :].any()


def test_pose_import_is_light():
    code = "import sys, fashionshoot.data.pose; print(any(m in sys.modules for m in ('diffusers', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
