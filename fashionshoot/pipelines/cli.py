"""``fashionshoot generate``: garments + keypoints + prompt -> PNG files, from a saved pipeline folder.

Usage::

    fashionshoot generate [--config FILE] pipeline=DIR garments.top=top.jpg garments.shoes=shoes.jpg \\
        keypoints=pose.json prompt="on a rooftop at dusk" out_dir=outputs [key=value ...]

``keypoints`` is a JSON file holding ``[[x, y, confidence], ...]`` (18 COCO, 16 MPII or 25 BODY_25
joints), or ``{"keypoints": [...], "size": [width, height]}`` (rescaled to the output size), or an
OpenPose file (the first person's ``pose_keypoints_2d``). The resolved config is written next to the
images.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fashionshoot.config import config_from_argv, save_config
from fashionshoot.errors import DataError, FashionshootError

if TYPE_CHECKING:
    import numpy as np

SchedulerName = Literal["default", "ddim", "euler", "euler_a", "dpm++"]


@dataclass
class GenerateConfig:
    """What ``fashionshoot generate`` does; every field is a ``key=value`` override."""

    pipeline: str = ""
    garments: dict[str, str] = field(default_factory=dict)
    keypoints: str = ""
    prompt: str = ""
    negative_prompt: str = ""
    guidance_scale_text: float = 5.0
    guidance_scale_garment: float = 3.0
    steps: int = 30
    height: int | None = None
    width: int | None = None
    num_images: int = 1
    seed: int = 0
    scheduler: SchedulerName = "default"
    device: str = "cpu"
    out_dir: str = "outputs/generate"


def read_keypoints(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Keypoints from a JSON file (see the module doc), in the ``(width, height)`` output frame."""
    from fashionshoot.data.pose import as_keypoints, rescale_keypoints

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read keypoints JSON ({exc})") from exc
    if isinstance(data, dict) and "people" in data:
        if not data["people"]:
            raise DataError(f"{path}: OpenPose file has no people")
        data = data["people"][0]["pose_keypoints_2d"]
    frame = None
    if isinstance(data, dict):
        frame = data.get("size")
        data = data.get("keypoints")
    keypoints = as_keypoints(data, where=str(path))
    return rescale_keypoints(keypoints, tuple(frame), size) if frame else keypoints


def _set_scheduler(pipe: Any, name: SchedulerName) -> None:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
    )

    classes = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler,
               "dpm++": DPMSolverMultistepScheduler}
    if name != "default":
        pipe.scheduler = classes[name].from_config(pipe.scheduler.config)


def generate(config: GenerateConfig) -> list[Path]:
    """Load the pipeline, generate ``num_images`` images, write them as PNGs; returns their paths."""
    import torch
    from PIL import Image

    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline

    if not config.pipeline:
        raise DataError("pipeline=DIR is required (a saved PhotoshootPipeline folder or hub id)")
    garments = {}
    for slot, image_path in config.garments.items():
        try:
            garments[slot] = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise DataError(f"garment {slot!r}: cannot read image {image_path} ({exc})") from exc
    pipe = load_photoshoot_pipeline(config.pipeline).to(config.device)
    _set_scheduler(pipe, config.scheduler)
    height = config.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = config.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    keypoints = read_keypoints(config.keypoints, (width, height)) if config.keypoints else None
    images = pipe(
        garments=garments, keypoints=keypoints, prompt=config.prompt, negative_prompt=config.negative_prompt,
        guidance_scale_text=config.guidance_scale_text, guidance_scale_garment=config.guidance_scale_garment,
        num_inference_steps=config.steps, height=height, width=width, num_images_per_prompt=config.num_images,
        generator=torch.Generator(device=config.device).manual_seed(config.seed),
    ).images
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, out_dir)
    paths = [out_dir / f"image_{i:03d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths


def generate_main(argv: list[str]) -> int:
    """Parse ``[--config FILE] [key=value ...]``, generate, print the written paths; exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        paths = generate(config_from_argv(GenerateConfig, argv))
    except FashionshootError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(generate_main(sys.argv[1:]))
