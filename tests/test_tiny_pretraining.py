"""A fitted tiny VAE reconstructs the images a random one cannot, and loads back with its scaling factor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fashionshoot.data.synthetic import SyntheticConfig, SyntheticFashion
from fashionshoot.pipelines.tiny_pretraining import save_pretrained_tiny_photoshoot_pipeline
from fashionshoot.training.data import vae_pixels

pytestmark = pytest.mark.usefixtures("one_thread")


def _reconstruction_mse(vae: torch.nn.Module, pixels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((vae.decode(vae.encode(pixels).latent_dist.mode()).sample - pixels).pow(2).mean())


def test_fitted_vae_reconstructs_and_round_trips(tmp_path: Path) -> None:
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

    dataset = SyntheticFashion(SyntheticConfig(num_garments=12, lookbooks_per_garment=1, lookbook_size=(64, 48)))
    images = [dataset.lookbook(i, 0, styles=("real",)).images["real"] for i in range(12)]
    pixels = vae_pixels(images, (32, 24))
    random_vae = load_photoshoot_pipeline(save_tiny_photoshoot_pipeline(tmp_path / "random")).vae
    folder, fit = save_pretrained_tiny_photoshoot_pipeline(tmp_path / "fitted", images, vae_steps=60)
    fitted = load_photoshoot_pipeline(folder).vae
    assert fitted.config.scaling_factor == pytest.approx(fit["scaling_factor"])
    assert _reconstruction_mse(fitted, pixels) == pytest.approx(fit["mse"], rel=1e-4)
    assert fit["mse"] < 0.5 * _reconstruction_mse(random_vae, pixels)


def test_training_images_are_the_distinct_pictures_of_the_pairs_evenly_capped(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    from fashionshoot.data.records import PairRecord
    from fashionshoot.pipelines import tiny_pretraining

    for i in range(6):
        Image.new("RGB", (4, 4), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    # Two pairs share garment 0.png: it is fitted once.
    records = [PairRecord("a", "g0", "l1", "0.png", "1.png"), PairRecord("b", "g0", "l2", "0.png", "2.png"),
               PairRecord("c", "g3", "l4", "3.png", "4.png"), PairRecord("d", "g3", "l5", "3.png", "5.png")]
    reds = [img.getpixel((0, 0))[0] for img in tiny_pretraining.training_images(records, tmp_path)]
    assert reds == [0, 40, 80, 120, 160, 200]
    monkeypatch.setattr(tiny_pretraining, "MAX_FIT_IMAGES", 3)
    reds = [img.getpixel((0, 0))[0] for img in tiny_pretraining.training_images(records, tmp_path)]
    assert reds == [0, 80, 160]  # every second one, spread over the whole set
