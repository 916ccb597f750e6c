"""``fashionshoot generate``: garments + keypoints + prompt -> PNG files, from a saved pipeline folder;
or one image per pair of a manifest split, written as an evaluation set.

Usage::

    fashionshoot generate [--config FILE] pipeline=DIR garments.top=top.jpg garments.shoes=shoes.jpg \\
        keypoints=pose.json prompt="on a rooftop at dusk" out_dir=outputs [key=value ...]
    fashionshoot generate pipeline=DIR pairs=pairs.jsonl split=test height=512 width=384 out_dir=eval_set

With ``pairs`` each pair of the ``split`` (``num_pairs`` of them, 0: all) is generated with its garment
in its slot, its pose and its caption (``pair_prompts=empty``: none), in batches of ``batch_size``, and
``out_dir`` gets ``generated/<pair_id>.png``, ``references/<pair_id>.png`` (the ground-truth lookbook
resized to the output size, bicubic), ``garments/<garment_id>.png`` (the product shots) and
``pairs.csv`` (``generated,reference,category,caption,garment``): exactly what ``eval/generation.py``
reads (its ``manifest``, ``references`` and ``garments`` keys); the command to run it is printed.
``garments``, ``keypoints``, ``prompt``, ``negative_prompt`` and ``num_images`` belong to the single
mode and are refused with ``pairs``.

``keypoints`` is a JSON file holding ``[[x, y, confidence], ...]`` (18 COCO, 16 MPII or 25 BODY_25
joints), or ``{"keypoints": [...], "size": [width, height]}`` (rescaled to the output size), or an
OpenPose file (the first person's ``pose_keypoints_2d``). The resolved config is written next to the
images.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fashionshoot.config import config_from_argv, save_config
from fashionshoot.errors import ConfigError, DataError, FashionshootError

#: Pair and garment ids become file names in an evaluation set.
_SAFE_STEM = re.compile(r"[A-Za-z0-9._-]+")

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
    device: str = "auto"
    out_dir: str = "outputs/generate"
    pairs: str = ""
    split: str = "test"
    num_pairs: int = 0
    pair_prompts: Literal["caption", "empty"] = "caption"
    batch_size: int = 8
    slot_map: dict[str, str] = field(default_factory=lambda: {"trousers": "bottom", "skirt": "bottom"})

    def __post_init__(self) -> None:
        bad = [f"{key}={getattr(self, key)}" for key in ("steps", "num_images", "batch_size") if getattr(self, key) < 1]
        if bad:
            raise ConfigError(f"must be at least 1: {', '.join(bad)}")


#: Keys of one generation, and keys of an evaluation set (``pairs=``): each mode refuses the other's.
SINGLE_IMAGE_KEYS = ("garments", "keypoints", "prompt", "negative_prompt", "num_images")
PAIRS_KEYS = ("split", "num_pairs", "pair_prompts", "batch_size", "slot_map")


def _changed(config: GenerateConfig, keys: tuple[str, ...]) -> list[str]:
    """Which of ``keys`` are set to something other than their default."""
    default = GenerateConfig()
    return [key for key in keys if getattr(config, key) != getattr(default, key)]


def read_keypoints(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Keypoints from a JSON file (see the module doc), in the ``(width, height)`` output frame."""
    from fashionshoot.data.pose import as_keypoints, rescale_keypoints
    from fashionshoot.models.pose import to_coco18

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read keypoints JSON ({exc})") from exc
    if isinstance(data, dict) and "people" in data:
        if not data["people"]:
            raise DataError(f"{path}: OpenPose file has no people")
        person = data["people"][0]
        if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
            raise DataError(f"{path}: the first OpenPose person has no 'pose_keypoints_2d' (body keypoints)")
        data = person["pose_keypoints_2d"]
    frame = None
    if isinstance(data, dict):
        frame = data.get("size")
        data = data.get("keypoints")
    keypoints = as_keypoints(data, where=str(path))
    to_coco18(keypoints, where=str(path))  # a joint count no format has: named here, with the file
    if frame is None:
        return keypoints
    if not (isinstance(frame, list) and len(frame) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in frame)):
        raise DataError(f"{path}: 'size' must be [width, height], two positive numbers; got {frame!r}")
    return rescale_keypoints(keypoints, tuple(frame), size)


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


def _load(config: GenerateConfig) -> tuple[Any, int, int]:
    """The pipeline on ``config.device`` (``auto``: CUDA when there is one) with the chosen scheduler, and
    the output height and width."""
    import torch

    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline

    if not config.pipeline:
        raise DataError("pipeline=DIR is required (a saved PhotoshootPipeline folder or hub id)")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    pipe = load_photoshoot_pipeline(config.pipeline).to(device)
    _set_scheduler(pipe, config.scheduler)
    return pipe, config.height or pipe.default_size[0], config.width or pipe.default_size[1]


def generate(config: GenerateConfig) -> list[Path]:
    """Load the pipeline, generate ``num_images`` images, write them as PNGs; returns their paths.
    With ``config.pairs``: :func:`generate_eval_set`."""
    import torch
    from PIL import Image

    if config.pairs:
        return generate_eval_set(config)
    stray = _changed(config, PAIRS_KEYS)
    if stray:
        raise DataError(f"{', '.join(stray)} apply only with pairs=... (one image per pair of a manifest split): "
                        "give pairs=, or drop them")
    garments = {}
    for slot, image_path in config.garments.items():
        try:
            garments[slot] = Image.open(image_path).convert("RGB")
        except OSError as exc:
            raise DataError(f"garment {slot!r}: cannot read image {image_path} ({exc})") from exc
    pipe, height, width = _load(config)
    keypoints = read_keypoints(config.keypoints, (width, height)) if config.keypoints else None
    images = pipe(
        garments=garments, keypoints=keypoints, prompt=config.prompt, negative_prompt=config.negative_prompt,
        guidance_scale_text=config.guidance_scale_text, guidance_scale_garment=config.guidance_scale_garment,
        num_inference_steps=config.steps, height=height, width=width, num_images_per_prompt=config.num_images,
        generator=torch.Generator(device=pipe.device).manual_seed(config.seed),
    ).images
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(config, height=height, width=width), out_dir)  # the size used, not "default"
    paths = [out_dir / f"image_{i:03d}.png" for i in range(len(images))]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths


def _check_file_stems(names: list[str], what: str) -> None:
    for name in names:
        if not _SAFE_STEM.fullmatch(name):
            raise DataError(f"{what} {name!r} cannot name a file: use letters, digits, '.', '_' and '-' only")


def generate_eval_set(config: GenerateConfig) -> list[Path]:
    """One generation per pair of ``config.split`` in the ``config.pairs`` manifest, written with its
    reference and garment as an ``eval/generation.py`` input (see the module doc); returns the paths of
    the generated images. Images in the manifest are relative to its folder."""
    from PIL import Image
    from tqdm.auto import tqdm

    from fashionshoot.data.pairs import PairFilter, read_manifest
    from fashionshoot.training.validation import ValidationSettings, generate_pairs

    single = _changed(config, SINGLE_IMAGE_KEYS)
    if single:
        raise DataError(f"pairs=... generates one image per pair from its own garment, pose and caption "
                        f"(pair_prompts): drop {', '.join(single)}")
    manifest = Path(config.pairs)
    keep = PairFilter(split=config.split)
    records = [r for r in read_manifest(manifest) if keep.accepts(r)]
    if config.num_pairs > 0:
        records = records[: config.num_pairs]
    if not records:
        raise DataError(f"{manifest}: no pairs in split {config.split!r}")
    _check_file_stems([r.pair_id for r in records], "pair id")  # before any work, not mid-run
    _check_file_stems([r.garment_id for r in records], "garment id")
    if len({r.pair_id for r in records}) < len(records):
        raise DataError(f"{manifest}: pair ids repeat in split {config.split!r}; each names one output file")
    pipe, height, width = _load(config)
    pipe.set_progress_bar_config(disable=True)
    settings = ValidationSettings(steps=config.steps, guidance_text=config.guidance_scale_text,
                                  guidance_garment=config.guidance_scale_garment, seed=config.seed,
                                  resolution=(height, width), slot_map=dict(config.slot_map),
                                  prompts=config.pair_prompts, batch_size=config.batch_size)
    out = Path(config.out_dir)
    for folder in ("generated", "references", "garments"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(config, height=height, width=width), out)
    written, rows, garments = [], [], set()
    pairs = generate_pairs(pipe, records, manifest.parent, settings)
    for pair in tqdm(pairs, total=len(records), desc="generating", unit="pair"):
        stem, garment = pair.record.pair_id, pair.record.garment_id
        pair.image.save(out / "generated" / f"{stem}.png")
        pair.lookbook.resize((width, height), Image.Resampling.BICUBIC).save(out / "references" / f"{stem}.png")
        if garment not in garments:
            garments.add(garment)
            pair.garment.save(out / "garments" / f"{garment}.png")
        rows.append({"generated": stem, "reference": stem, "category": pair.record.category, "caption": pair.prompt,
                     "garment": garment})
        written.append(out / "generated" / f"{stem}.png")
    with open(out / "pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["generated", "reference", "category", "caption", "garment"])
        writer.writeheader()
        writer.writerows(rows)
    return written


def eval_command(out_dir: str | Path) -> str:
    """The ``eval/generation.py`` command line for an evaluation set written by :func:`generate_eval_set`."""
    out = Path(out_dir)
    args = [f"generated=[{out / 'generated'}]", f"references=[{out / 'references'}]", f"manifest={out / 'pairs.csv'}",
            f"garments=[{out / 'garments'}]"]
    return "python eval/generation.py " + " ".join(shlex.quote(arg) for arg in args)  # paths may hold spaces


def generate_main(argv: list[str]) -> int:
    """Parse ``[--config FILE] [key=value ...]``, generate, print the written paths; exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    try:
        config = config_from_argv(GenerateConfig, argv)
        paths = generate(config)
    except FashionshootError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    if config.pairs:
        print(f"evaluate with: {eval_command(config.out_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(generate_main(sys.argv[1:]))
