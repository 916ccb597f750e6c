"""Give a tiny random photoshoot pipeline the one pretrained part a real base model always has: its VAE.

A real base pipeline (SD-1.5, SDXL) comes with a pretrained autoencoder; the tiny testbed of
:mod:`fashionshoot.pipelines.testing` has a *random* one, whose decoder turns any latent into
meaningless colours. Anything measured on decoded images (garment fidelity, pose following) is then
noise whatever the UNet learns. :func:`fit_tiny_vae` fits the tiny VAE as an autoencoder of the
images at hand (a few hundred CPU steps at low resolution; the images should be training images only)
and sets its ``scaling_factor`` so scaled latents have unit RMS, as SD's 0.18215 does for its VAE.
:func:`save_pretrained_tiny_photoshoot_pipeline` writes a tiny pipeline with such a VAE.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from fashionshoot.data.records import PairRecord
from fashionshoot.errors import DataError
from fashionshoot.training.data import vae_pixels

#: At most this many images (evenly spaced) fit a tiny VAE: plenty for a few hundred steps.
MAX_FIT_IMAGES = 2048


def fit_tiny_vae(
    pipeline_dir: str | Path,
    images: Sequence[Image.Image],
    resolution: tuple[int, int] = (32, 24),
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Fit ``<pipeline_dir>/vae`` to reconstruct ``images`` and save it back in place.

    Reconstruction MSE of posterior samples plus ``kl_weight`` x KL, AdamW with a one-cycle schedule,
    random horizontal flips, images resized to ``resolution`` ``(H, W)`` (the VAE is convolutional; fit
    it at the resolution it will encode). Returns the last training ``loss``, the ``mse`` of the
    posterior modes on all ``images`` after fitting, and the ``scaling_factor`` written to the config
    (1 / RMS of those modes). ``progress`` shows a bar with the loss (the default training run's fit
    takes over a minute on 2 cores).
    """
    from diffusers import AutoencoderKL
    from tqdm.auto import tqdm

    if not images:
        raise DataError("fit_tiny_vae needs at least one image")
    folder = Path(pipeline_dir) / "vae"
    vae = AutoencoderKL.from_pretrained(str(folder))
    data = vae_pixels(images, resolution)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=True)  # one kernel, not a loop per tensor
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    vae.train()
    loss = torch.zeros(())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # posterior sampling; the caller's global RNG is left untouched
        bar = tqdm(range(steps), desc="fitting the tiny VAE", unit="step", disable=not progress)
        for step in bar:
            batch = data[torch.randint(0, len(data), (batch_size,), generator=generator)]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample()).sample
            loss = torch.nn.functional.mse_loss(reconstruction, batch) + kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if progress and step % 50 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", refresh=False)
    vae.eval()
    with torch.no_grad():
        modes = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in data.split(64)])
        mse = torch.cat([vae.decode(chunk).sample for chunk in modes.split(64)]).sub(data).pow(2).mean()
    scaling = float(1.0 / modes.pow(2).mean().sqrt().clamp_min(1e-6))
    vae.register_to_config(scaling_factor=scaling)
    vae.save_pretrained(str(folder))
    return {"loss": float(loss.detach()), "mse": float(mse), "scaling_factor": scaling}


def training_images(records: Sequence[PairRecord], root: str | Path) -> list[Image.Image]:
    """The distinct lookbooks and product shots of ``records`` (paths relative to ``root``), at most
    :data:`MAX_FIT_IMAGES` of them, evenly spaced: what a tiny VAE is fitted on (training pairs only)."""
    paths = sorted({r.lookbook_image for r in records} | {r.garment_image for r in records})
    stride = max(1, -(-len(paths) // MAX_FIT_IMAGES))
    images = []
    for path in paths[::stride]:
        with Image.open(Path(root) / path) as img:
            images.append(img.convert("RGB"))
    return images


def save_pretrained_tiny_photoshoot_pipeline(
    save_dir: str | Path,
    images: Sequence[Image.Image],
    resolution: tuple[int, int] = (32, 24),
    vae_steps: int = 300,
    seed: int = 0,
    progress: bool = False,
    **tiny: Any,
) -> tuple[Path, dict[str, float]]:
    """:func:`~fashionshoot.pipelines.testing.save_tiny_photoshoot_pipeline` (``tiny`` passed on; a fresh
    zero-initialised adapter unless told otherwise) followed by :func:`fit_tiny_vae` on ``images``
    (``vae_steps`` 0: the VAE stays random; ``progress`` shows its bar). Returns the folder and the VAE
    fit's figures."""
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

    tiny.setdefault("randomize_zero_init", False)
    folder = save_tiny_photoshoot_pipeline(save_dir, seed=seed, **tiny)
    if vae_steps == 0:
        return folder, {}
    return folder, fit_tiny_vae(folder, images, resolution=resolution, steps=vae_steps, seed=seed, progress=progress)
