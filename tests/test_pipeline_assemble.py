"""Assembling a photoshoot pipeline from SD + image-encoder folders; inpainting bases; training from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionshoot.errors import ConfigError, DataError
from fashionshoot.pipelines.assemble import assemble_photoshoot_pipeline
from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

KEYPOINTS = np.array([[8.0, 3.0]] * 18)  # in 16x16 output pixels
GARMENT = Image.new("RGB", (32, 32), (200, 30, 30))


def _latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_assembled_pipeline_starts_as_its_base_model(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assemble_photoshoot_pipeline(tiny_models["sd"], tiny_models["clip"]).save_pretrained(str(tmp_path / "p"))
    pipe = load_photoshoot_pipeline(tmp_path / "p")
    assert (pipe.unet_inputs.inpaint, pipe.pose_channels) == (0, 18)
    ours = pipe(garments={"top": GARMENT}, keypoints=KEYPOINTS, prompt="a red top", guidance_scale_text=4.0,
                guidance_scale_garment=2.0, num_inference_steps=3, latents=_latents(), output_type="np").images

    base = StableDiffusionPipeline.from_pretrained(str(tiny_models["sd"]), safety_checker=None,
                                                   requires_safety_checker=False)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    theirs = base(prompt="a red top", guidance_scale=4.0, num_inference_steps=3, latents=_latents(),
                  height=16, width=16, output_type="np").images
    # Zero-initialised garment values and pose weights: standard classifier-free guidance of the base.
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_inpainting_base_keeps_a_scene_when_given_one(tiny_models: dict[str, Path]) -> None:
    pipe = assemble_photoshoot_pipeline(tiny_models["sd_inpaint"], tiny_models["clip"])
    assert (pipe.unet_inputs.inpaint, pipe.pose_channels, pipe.unet.config.in_channels) == (5, 18, 27)
    scene = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    common = dict(garments={"top": GARMENT}, keypoints=KEYPOINTS, num_inference_steps=2, output_type="np")
    fresh = pipe(latents=_latents(), **common).images
    kept = pipe(image=scene, mask_image=mask, latents=_latents(), **common).images
    assert fresh.shape == kept.shape == (1, 16, 16, 3)
    assert np.abs(fresh - kept).max() > 1e-3  # the scene reaches the UNet
    with pytest.raises(DataError, match="image and a mask_image"):
        pipe(image=scene, **common)

    plain = assemble_photoshoot_pipeline(tiny_models["sd"], tiny_models["clip"])
    with pytest.raises(DataError, match="inpainting UNet"):
        plain(image=scene, mask_image=mask, **common)


def test_unsupported_image_encoder_is_named(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="'siglip2'"):
        assemble_photoshoot_pipeline(tiny_models["sd"], tiny_models["siglip2"])


def test_training_from_an_inpainting_base_moves_only_pose_input_weights(tiny_models: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from fashionshoot.config import config_from_argv
    from fashionshoot.pipelines.testing import saved_weights
    from fashionshoot.training import PhotoshootTrainConfig, run

    config = config_from_argv(PhotoshootTrainConfig, [
        f"output_dir={tmp_path}", f"model.base={tiny_models['sd_inpaint']}", f"model.image_encoder={tiny_models['clip']}",
        "optim.max_steps=2", "optim.warmup_steps=0", "optim.batch_size=2", "validation.steps=1", "validation.num_pairs=2", "validation.grid_rows=1",
        "log_with=none", "data.synthetic.num_garments=6", "data.resolution=[32,32]",
    ])
    results = run(config)
    before = saved_weights(tmp_path / "base", ("unet",))["unet.conv_in.weight"]
    after = saved_weights(results["pipeline"], ("unet",))["unet.conv_in.weight"]
    assert after.shape[1] == 27
    assert torch.equal(before[:, :9], after[:, :9]) and not torch.equal(before[:, 9:], after[:, 9:])
    with pytest.raises(ConfigError, match="go together"):
        config_from_argv(PhotoshootTrainConfig, [f"model.base={tiny_models['sd']}"])


@pytest.mark.parametrize("name", ["photoshoot_sd15", "photoshoot_sd2_inpainting"])
def test_real_configs_only_need_weights(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped real configs parse, and fail on missing weights by naming them (never a silent tiny model)."""
    from fashionshoot.config import config_from_argv
    from fashionshoot.errors import MissingWeightsError
    from fashionshoot.training import PhotoshootTrainConfig, run
    from fashionshoot.training.data import load_records

    monkeypatch.delenv("FASHIONSHOOT_WEIGHTS", raising=False)
    load_records(PhotoshootTrainConfig().data, tmp_path)
    path = Path(__file__).resolve().parent.parent / "configs" / f"{name}.yaml"
    overrides = [f"output_dir={tmp_path / 'run'}", f"data.manifest={tmp_path / 'synthetic' / 'pairs.jsonl'}"]
    config = config_from_argv(PhotoshootTrainConfig, overrides, default_path=path)
    assert config.data.resolution == (512, 384)
    with pytest.raises(MissingWeightsError, match=config.model.base.replace("/", ".")):
        run(config)
