"""Pose channels: zero-initialised conv_in expansion that round-trips, and keypoint -> heatmap input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from fashionshoot import testing
from fashionshoot.data.pose import convert_keypoints
from fashionshoot.errors import DataError
from fashionshoot.models.pose import POSE_CHANNELS, expand_conv_in, pose_maps, pose_sigma, to_coco18
from fashionshoot.weights import load_pretrained

pytestmark = pytest.mark.usefixtures("one_thread")


def _keypoints(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(4, 28, size=(n, 2)).astype(np.float32)


def _predict(unet, latents, pose, ehs):
    return unet(torch.cat([latents, pose], dim=1), 10, ehs).sample


@pytest.mark.parametrize("inpainting", [False, True])
def test_zero_initialised_pose_channels_leave_output_unchanged_then_matter(inpainting, tmp_path):
    torch.manual_seed(0)
    base_channels = 9 if inpainting else 4
    unet = testing.tiny_unet(in_channels=base_channels)
    latents, ehs = torch.randn(1, base_channels, 16, 16), torch.randn(1, 77, 32)
    base = unet(latents, 10, ehs).sample
    expand_conv_in(unet)
    assert unet.config.in_channels == base_channels + POSE_CHANNELS
    pose = pose_maps([_keypoints(18)], (32, 32), (16, 16))
    assert torch.equal(_predict(unet, latents, pose, ehs), base)

    with torch.no_grad():
        unet.conv_in.weight[:, base_channels:].normal_(std=0.1)
    posed = _predict(unet, latents, pose, ehs)
    assert not torch.allclose(posed, base)
    unet.save_pretrained(tmp_path)
    loaded = load_pretrained(UNet2DConditionModel, tmp_path)
    assert loaded.config.in_channels == base_channels + POSE_CHANNELS
    assert torch.equal(_predict(loaded, latents, pose, ehs), posed)


def test_pose_maps_shape_and_missing_pose():
    maps = pose_maps([_keypoints(18), None], (64, 48), (8, 6))
    assert maps.shape == (2, POSE_CHANNELS, 8, 6)
    assert maps[0].amax() > 0.2 and maps[1].abs().sum() == 0


def test_mpii16_is_converted_to_coco18():
    mpii = _keypoints(16)
    direct = pose_maps([mpii], (32, 32), (16, 16))
    converted = pose_maps([convert_keypoints(np.c_[mpii, np.ones(16)], "mpii16", "coco18")], (32, 32), (16, 16))
    assert torch.equal(direct, converted)
    assert to_coco18(mpii).shape == (18, 3)


def test_keypoints_outside_the_image_are_not_an_error():
    kp = _keypoints(18)
    kp[:5] = [[-500, 10], [1e6, 1e6], [40, -3], [-1, -1], [33, 33]]
    maps = pose_maps([kp], (32, 32), (16, 16))
    assert torch.isfinite(maps).all()
    assert maps[0, 1].abs().max() == 0  # far away: nothing reaches the frame


@pytest.mark.parametrize("bad, message", [
    (np.zeros((18, 5)), "shape"),
    (np.zeros((17, 2)), "accepted joint counts"),
    ("not keypoints", "not numeric"),
])
def test_wrong_keypoint_shapes_raise_clear_errors(bad, message):
    with pytest.raises(DataError, match=message):
        pose_maps([bad], (32, 32), (16, 16))


@pytest.mark.parametrize(("image_size", "latent_size"), [((512, 384), (64, 48)), ((70, 50), (9, 7)), ((32, 32), (32, 32))])
def test_separable_pose_maps_equal_resized_full_heatmaps(image_size, latent_size):
    import torch.nn.functional as F

    from fashionshoot.data.pose import keypoint_heatmaps

    rng = np.random.default_rng(0)
    kp = np.c_[rng.uniform(-20, image_size[1] + 20, 18), rng.uniform(-20, image_size[0] + 20, 18), rng.integers(0, 2, 18)]
    sigma = pose_sigma(image_size, latent_size)
    reference = F.interpolate(keypoint_heatmaps(kp, image_size, sigma)[None], size=latent_size, mode="bilinear",
                              align_corners=False)
    assert torch.allclose(pose_maps([kp], image_size, latent_size), reference, atol=1e-6)


def test_heatmaps_are_never_narrower_than_a_latent_pixel():
    assert pose_sigma((512, 384), (64, 48)) == 9.0  # MGD / Fashion-RAG at SD size
    assert pose_sigma((32, 24), (16, 12)) == 2.0  # one latent pixel, not 0.56 px
    kp = _keypoints(18)
    kp[:, :2] = np.round(kp[:, :2] / 2) * 2 + 0.5  # joints between latent samples
    peaks = pose_maps([kp], (32, 32), (16, 16)).amax(dim=(-1, -2))
    assert peaks.min() > 0.5  # every joint is clearly present in the UNet input
