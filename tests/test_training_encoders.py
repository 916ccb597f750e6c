"""The training step's frozen encoders and collated pose: the work they skip changes no result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from fashionshoot.errors import ConfigError
from fashionshoot.models.garment_encoder import encode_garment_pixels, scatter_slots
from fashionshoot.models.pose import pose_maps
from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline
from fashionshoot.training.loop import Frozen

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Frozen:
    base = save_tiny_photoshoot_pipeline(tmp_path_factory.mktemp("tiny") / "base", conditioning="cross_attention")
    return Frozen(load_photoshoot_pipeline(base), torch.device("cpu"), torch.float32)


@contextlib.contextmanager
def batch_sizes(module: torch.nn.Module) -> Iterator[list[int]]:
    """The batch size of every forward call ``module`` gets inside the block."""
    seen: list[int] = []

    def record(_: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append(len(args[0] if args else next(iter(kwargs.values()))))

    handle = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def test_text_encodes_each_distinct_prompt_once_and_returns_trainable_inputs(frozen: Frozen) -> None:
    prompts = ["", "red dress", "", "", "red dress", "blue coat"]
    with batch_sizes(frozen.pipe.text_encoder) as seen:
        states = frozen.text(prompts)
    assert seen == [3]
    with torch.no_grad():
        one_by_one = torch.cat([frozen.pipe.text_encoder(frozen.pipe.tokenizer(
            [p], padding="max_length", max_length=frozen.pipe.tokenizer.model_max_length, truncation=True,
            return_tensors="pt").input_ids)[0] for p in prompts])
    torch.testing.assert_close(states, one_by_one, atol=1e-5, rtol=1e-5)
    # encoded under inference_mode, yet a normal tensor: autograd may save it for a trained layer's backward
    assert not states.is_inference()
    layer = torch.nn.Linear(states.shape[-1], 2)
    layer(states).sum().backward()
    assert layer.weight.grad is not None


def test_garment_features_encode_only_the_kept_garments(frozen: Frozen) -> None:
    slots = len(frozen.pipe.slots)
    present = torch.zeros(4, slots, dtype=torch.bool)
    present[[0, 1, 2, 3], [0, 2, 0, 5]] = True
    pixels = torch.randn(4, 3, 32, 32)
    layer = frozen.pipe.garment_adapter.config.feature_layer
    with torch.no_grad():
        every = scatter_slots(encode_garment_pixels(frozen.pipe.image_encoder, pixels, layer), present)
    kept = present.clone()
    kept[1] = False  # sample 1's garment dropped by condition dropout

    with batch_sizes(frozen.pipe.image_encoder) as seen:
        features = frozen.garment_features(pixels[kept[present]], kept)
        nothing = frozen.garment_features(pixels[:0], torch.zeros_like(present))
    assert seen == [3]  # the dropped garment was not encoded; with none kept the encoder did not run
    torch.testing.assert_close(features[kept], every[kept], atol=1e-5, rtol=1e-5)
    assert not features[~kept].any() and not features.is_inference()
    assert nothing.shape[:2] == present.shape and not nothing.any()


def test_latents_are_normal_tensors_with_and_without_a_posterior_sample(frozen: Frozen) -> None:
    from fashionshoot.training.randomness import SampleRandomness

    pixels = torch.rand(2, 3, 32, 24) * 2 - 1
    mode = frozen.latents(pixels)
    sample = frozen.latents(pixels, SampleRandomness.for_batch(0, 1, 0, 2))
    assert not mode.is_inference() and not sample.is_inference()
    assert mode.shape == sample.shape and not torch.equal(mode, sample)


def test_collator_draws_the_pose_maps_and_the_loss_refuses_a_batch_without_them(frozen: Frozen) -> None:
    from transformers import CLIPImageProcessor

    from fashionshoot.data.records import PairRecord
    from fashionshoot.models.outfit import OUTFIT_SLOTS
    from fashionshoot.training.config import DropoutConfig, LossConfig
    from fashionshoot.training.data import PhotoshootCollator
    from fashionshoot.training.loop import training_loss
    from fashionshoot.training.randomness import SampleRandomness

    keypoints = np.c_[np.random.default_rng(0).uniform(4, 40, (18, 2)), np.ones(18)].tolist()
    record = PairRecord("p", "g", "l", "g.png", "l.png", category="top", keypoints=keypoints)
    samples = [{"record": record, "garment": Image.new("RGB", (8, 8)), "lookbook": Image.new("RGB", (48, 64)),
                "weight": 1.0}]
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    batch = PhotoshootCollator(processor, OUTFIT_SLOTS, {}, (32, 24), "cross_attention", (16, 12))(samples)
    torch.testing.assert_close(batch["pose"], pose_maps(batch["keypoints"], (32, 24), (16, 12)))
    assert batch["pose"].amax() > 0.5  # the joints landed in the frame

    from diffusers import DDPMScheduler

    from fashionshoot.models.denoiser import PhotoshootDenoiser

    pipe = frozen.pipe
    denoiser = PhotoshootDenoiser(pipe.unet, pipe.garment_adapter)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(batch: dict) -> torch.Tensor:
        return training_loss(denoiser, frozen, scheduler, batch, SampleRandomness.for_batch(0, 1, 0, 1),
                             DropoutConfig(), LossConfig())

    assert torch.isfinite(loss(batch))
    without = {k: v for k, v in batch.items() if k != "pose"}
    with pytest.raises(ConfigError, match=r"pose heatmaps at the latent size \(16, 12\).*no 'pose'.*latent_size"):
        loss(without)
    with pytest.raises(ConfigError, match=r"'pose' of \(8, 6\)"):
        loss({**batch, "pose": batch["pose"][..., ::2, ::2]})
