"""Validation of a photoshoot generator on held-out pairs: does it show *the* garment, in *the* pose?

:func:`validate` generates one image per test pair (the pair's garment in its slot, the pair's pose,
no text by default so only the garment can carry identity) and measures:

* **Garment fidelity R@k** (:class:`~fashionshoot.metrics.fidelity.GarmentRetrievalRecall`): each
  generation is a query against a gallery of every distinct test garment (product shots); a hit is
  its own source garment. Where a record has a ``crop_box``, the query is the generation cropped to
  that box (the garment's place in the ground-truth lookbook of the same pose, scaled to the output
  size): a detector crop with a known box, so the scene around the figure does not dominate the
  embedding. The default encoder is the training-free colour :class:`~fashionshoot.retrieval.encoders.
  HistogramEncoder`; reported with ``chance_r@k`` (k / gallery size), ``oracle_r@k`` (the same
  protocol applied to the ground-truth lookbooks at the output size: the ceiling of this encoder) and
  ``autoencoder_r@k`` (the ground truth after a round trip through the pipeline's VAE: what its decoder
  can show at best, so a low R@k can be told apart into "the UNet did not learn it" and "the VAE cannot
  show it").
* **Pose following**: does the garment sit where the given pose puts it? Each test garment has
  lookbooks in several poses. For pair ``i`` a likeness map ``L_i`` scores every pixel by its colour
  distance to the nearest colour of garment ``i`` (product shot, background removed). ``pose_own`` is the
  Pearson correlation of ``L_i`` on the generation with ``L_i`` on the ground-truth lookbook of the pose
  it was given; ``pose_other`` the mean correlation with ``L_i`` on the same garment's lookbooks in its
  *other* poses; ``pose_contrast`` their difference and ``pose_accuracy`` the fraction of (pair, other
  pose) with own > other (chance 0.5; the ground truth itself scores 1). Same garment on both sides, so
  only the pose (where, how large, which way the limbs go) can make the difference; a model that ignores
  the pose scores contrast ~0 and accuracy ~0.5. Pairs whose garment has one lookbook are skipped
  (``pose_pairs`` counts the comparisons).

Everything is deterministic given the pipeline, the records and :class:`ValidationSettings`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from fashionshoot.data.records import PairRecord
from fashionshoot.errors import DataError

#: Product-shot pixels brighter than this in every channel are studio backdrop, not garment.
_BACKGROUND = 235
_PALETTE_SIZE = 16


@dataclass
class ValidationSettings:
    """What :func:`validate` generates and how it measures.

    ``num_pairs``: how many test pairs to generate (0: all), taken one lookbook per garment first so
    every garment is queried before any is queried twice. ``resolution``: output ``(height, width)``.
    ``prompts``: ``"empty"`` (default: garment and pose only, so fidelity cannot come from a caption
    naming the colour) or ``"caption"`` (the record's ``metadata["caption"]``). With empty prompts the
    text branch equals the garment branch, so ``guidance_text`` is set to ``guidance_garment`` (one
    fewer UNet branch, same result). ``crop``: query with the generation cropped to the record's
    ``crop_box`` when it has one. ``ks``: the R@k reported. ``colour_sigma``: colour distance
    (0-255 RGB units) at which a pixel's garment likeness falls to ``exp(-1/2)``.
    """

    num_pairs: int = 0
    steps: int = 20
    guidance_text: float = 3.0
    guidance_garment: float = 3.0
    seed: int = 0
    resolution: tuple[int, int] = (64, 48)
    slot_map: dict[str, str] = field(default_factory=lambda: {"trousers": "bottom", "skirt": "bottom"})
    prompts: Literal["empty", "caption"] = "empty"
    batch_size: int = 16
    crop: bool = True
    ks: tuple[int, ...] = (1, 5)
    colour_sigma: float = 40.0


@dataclass
class ValidationResult:
    """``metrics`` (plain floats, see the module doc), the generated ``images`` and the ``records``,
    ``garments`` and ``lookbooks`` (resized ground truth) they were generated for, in the same order."""

    metrics: dict[str, float]
    images: list[Image.Image]
    records: list[PairRecord]
    garments: list[Image.Image]
    lookbooks: list[Image.Image]

    def grid(self, max_rows: int = 8) -> Image.Image:
        """Rows of garment | generated | ground truth, at most ``max_rows``, tiles at the generation size."""
        rows = list(zip(self.garments, self.images, self.lookbooks, strict=True))[:max_rows]
        width, height = self.images[0].size
        grid = Image.new("RGB", (3 * width, len(rows) * height))
        for r, tiles in enumerate(rows):
            for c, tile in enumerate(tiles):
                grid.paste(tile.convert("RGB").resize((width, height)), (c * width, r * height))
        return grid


def select_pairs(records: Sequence[PairRecord], num_pairs: int = 0) -> list[PairRecord]:
    """Round-robin over garments (first lookbook of each garment, then the second, ...), first ``num_pairs``."""
    by_garment: dict[str, list[PairRecord]] = {}
    for record in records:
        by_garment.setdefault(record.garment_id, []).append(record)
    order: list[PairRecord] = []
    depth = max((len(v) for v in by_garment.values()), default=0)
    for level in range(depth):
        order += [group[level] for group in by_garment.values() if level < len(group)]
    return order[:num_pairs] if num_pairs > 0 else order


def _box(record: PairRecord, source: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """The record's garment box, from source lookbook pixels (w, h) to output pixels ``size`` (h, w)."""
    if record.crop_box is None:
        return None
    sx, sy = size[1] / source[0], size[0] / source[1]
    x1, y1, x2, y2 = record.crop_box
    left, top = int(np.floor(x1 * sx)), int(np.floor(y1 * sy))
    right, bottom = int(np.ceil(x2 * sx)), int(np.ceil(y2 * sy))
    left, top = min(max(left, 0), size[1] - 1), min(max(top, 0), size[0] - 1)
    return left, top, max(min(right, size[1]), left + 1), max(min(bottom, size[0]), top + 1)


def _to_tensor(image: Image.Image, side: int) -> torch.Tensor:
    array = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BICUBIC), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 255.0


def _palette(garment: Image.Image) -> np.ndarray:
    """Up to ``_PALETTE_SIZE**2`` foreground colours of a product shot (float RGB rows)."""
    small = np.asarray(garment.convert("RGB").resize((_PALETTE_SIZE, _PALETTE_SIZE), Image.Resampling.BOX),
                       dtype=np.float32).reshape(-1, 3)
    foreground = small[~(small > _BACKGROUND).all(1)]
    return foreground if len(foreground) else small


def _likeness(image: Image.Image, palette: np.ndarray, sigma: float) -> np.ndarray:
    """``(H, W)`` in [0, 1]: exp(-d^2 / 2 sigma^2) of each pixel's distance to the nearest palette colour."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    d2 = ((pixels.reshape(-1, 1, 3) - palette[None]) ** 2).sum(-1).min(1)
    return np.exp(-d2 / (2 * sigma**2)).reshape(pixels.shape[:2])


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two maps (0 when either is constant)."""
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


def pose_scores(images: Sequence[Image.Image], truths: Sequence[Image.Image],
                other_poses: Sequence[Sequence[Image.Image]], garments: Sequence[Image.Image],
                colour_sigma: float = 40.0) -> dict[str, float]:
    """``pose_own``, ``pose_other``, ``pose_contrast``, ``pose_accuracy``, ``pose_pairs`` (see module doc).

    ``images[i]`` was generated for ``garments[i]`` in the pose of ``truths[i]`` (its ground-truth
    lookbook); ``other_poses[i]`` are lookbooks of the same garment in other poses, all at the size of
    ``images``. Returns NaNs (and ``pose_pairs`` 0) when no pair has another pose to compare with.
    """
    own, other, wins, trials = [], [], 0.0, 0
    for image, truth, alternatives, garment in zip(images, truths, other_poses, garments, strict=True):
        if not alternatives:
            continue
        palette = _palette(garment)
        generated = _likeness(image, palette, colour_sigma)
        mine = _correlation(generated, _likeness(truth, palette, colour_sigma))
        theirs = [_correlation(generated, _likeness(alt, palette, colour_sigma)) for alt in alternatives]
        own.append(mine)
        other.append(float(np.mean(theirs)))
        wins += sum(mine > t for t in theirs) + 0.5 * sum(mine == t for t in theirs)
        trials += len(theirs)
    if not own:
        return {**{k: float("nan") for k in ("pose_own", "pose_other", "pose_contrast", "pose_accuracy")},
                "pose_pairs": 0.0}
    return {"pose_own": float(np.mean(own)), "pose_other": float(np.mean(other)),
            "pose_contrast": float(np.mean(own) - np.mean(other)), "pose_accuracy": wins / trials,
            "pose_pairs": float(trials)}


def _recall(encoder: Any, gallery: Sequence[Image.Image], gallery_ids: Sequence[str], queries: Sequence[Image.Image],
            query_ids: Sequence[str], ks: tuple[int, ...], side: int = 32) -> dict[int, float]:
    from fashionshoot.metrics import GarmentRetrievalRecall, from_pil_encoder
    from fashionshoot.metrics.protocol import DEFAULT_PROTOCOL

    encode = from_pil_encoder(encoder.embed_images)
    metric = GarmentRetrievalRecall.from_gallery_images(
        encode, [_to_tensor(g, side) for g in gallery], list(gallery_ids),
        protocol=DEFAULT_PROTOCOL.replace(retrieval_ks=tuple(ks)),
        sync_on_compute=False)  # validation runs on the main process only: no cross-process gather
    metric.update([_to_tensor(q, side) for q in queries], list(query_ids))
    return metric.compute()


def _lookbook(root: str | Path, record: PairRecord, size: tuple[int, int]) -> Image.Image:
    """The record's lookbook at output ``size`` ``(height, width)``, resized as the ground truth of a generation."""
    with Image.open(Path(root) / record.lookbook_image) as img:
        return img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC)


@torch.no_grad()
def autoencoded(pipe: Any, images: Sequence[Image.Image], batch_size: int = 16) -> list[Image.Image]:
    """``images`` after a VAE round trip (posterior mode) at their own size, as the pipeline decodes."""
    out: list[Image.Image] = []
    vae = pipe.vae
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        pixels = pipe.image_processor.preprocess(chunk, height=chunk[0].height, width=chunk[0].width)
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        out += pipe.image_processor.postprocess(vae.decode(latents).sample, output_type="pil")
    return out


def _crop(image: Image.Image, box: tuple[int, int, int, int] | None) -> Image.Image:
    return image if box is None else image.crop(box)


@dataclass
class GeneratedPair:
    """One generation of :func:`generate_pairs`: the test ``record``, its product shot ``garment`` and
    source ``lookbook`` (RGB, as read), the ``prompt`` it was generated with and the generated ``image``."""

    record: PairRecord
    garment: Image.Image
    lookbook: Image.Image
    prompt: str
    image: Image.Image


def generate_pairs(pipe: Any, records: Sequence[PairRecord], root: str | Path,
                   settings: ValidationSettings | None = None) -> Iterator[GeneratedPair]:
    """Generate one image per record, in order and in batches of ``settings.batch_size``: the record's
    garment in its slot, its pose, and an empty prompt or its caption (``settings.prompts``), at
    ``settings.resolution``, seeded by ``settings.seed`` (the same images however they are consumed).

    Image paths are relative to ``root``. The pipeline's progress bar and the global RNG are left as they are.
    """
    from fashionshoot.data.pairs import PairManifestDataset
    from fashionshoot.training.data import caption, category_slot, keypoints_at

    settings = settings or ValidationSettings()
    height, width = settings.resolution
    dataset = PairManifestDataset(list(records), root)
    guidance_text = settings.guidance_garment if settings.prompts == "empty" else settings.guidance_text
    generator = torch.Generator().manual_seed(settings.seed)
    for start in range(0, len(dataset), settings.batch_size):
        samples = [dataset[i] for i in range(start, min(start + settings.batch_size, len(dataset)))]
        outfits = [{pipe.slots[category_slot(s["record"].category, pipe.slots, settings.slot_map)]: s["garment"]}
                   for s in samples]
        keypoints = [keypoints_at(s["record"], s["lookbook"], settings.resolution) for s in samples]
        prompts = [caption(s["record"]) if settings.prompts == "caption" else "" for s in samples]
        images = pipe(garments=outfits, keypoints=keypoints, prompt=prompts, height=height, width=width,
                      num_inference_steps=settings.steps, guidance_scale_text=guidance_text,
                      guidance_scale_garment=settings.guidance_garment, generator=generator).images
        for sample, prompt, image in zip(samples, prompts, images, strict=True):
            yield GeneratedPair(sample["record"], sample["garment"].convert("RGB"), sample["lookbook"].convert("RGB"),
                                prompt, image)


def validate(pipe: Any, records: Sequence[PairRecord], root: str | Path, settings: ValidationSettings | None = None,
             encoder: Any = None) -> ValidationResult:
    """Generate one image per selected test pair with ``pipe`` (:func:`generate_pairs`) and measure
    fidelity and pose following.

    ``records``: the test pairs (all of them form the gallery, ``settings.num_pairs`` are generated),
    image paths relative to ``root``. ``encoder``: anything with ``embed_images(list[PIL]) -> (N, D)``
    (default: ``HistogramEncoder(bins=6)``). The pipeline's progress bar and RNG state are left as they
    are except for the seeded generator passed to it.
    """
    from fashionshoot.retrieval.encoders import HistogramEncoder

    settings = settings or ValidationSettings()
    if not records:
        raise DataError("validation needs at least one test pair")
    encoder = encoder or HistogramEncoder(bins=6)
    height, width = settings.resolution
    chosen = select_pairs(records, settings.num_pairs)
    gallery_records = {r.garment_id: r for r in records}  # one record per garment: its product shot

    images: list[Image.Image] = []
    garments: list[Image.Image] = []
    lookbooks: list[Image.Image] = []
    boxes: list[tuple[int, int, int, int] | None] = []
    for pair in generate_pairs(pipe, chosen, root, settings):
        images.append(pair.image)
        garments.append(pair.garment)
        lookbooks.append(pair.lookbook.resize((width, height), Image.Resampling.BICUBIC))
        boxes.append(_box(pair.record, pair.lookbook.size, settings.resolution) if settings.crop else None)

    gallery_ids = list(gallery_records)
    gallery = []
    for garment_id in gallery_ids:
        record = gallery_records[garment_id]
        with Image.open(Path(root) / record.garment_image) as img:
            gallery.append(img.convert("RGB"))
    query_ids = [r.garment_id for r in chosen]
    ks = tuple(settings.ks)

    def recall_of(queries: Sequence[Image.Image]) -> dict[int, float]:
        return _recall(encoder, gallery, gallery_ids, [_crop(i, b) for i, b in zip(queries, boxes, strict=True)],
                       query_ids, ks)

    recall, oracle = recall_of(images), recall_of(lookbooks)
    roundtrip = recall_of(autoencoded(pipe, lookbooks, settings.batch_size))
    metrics: dict[str, float] = {"num_pairs": float(len(chosen)), "num_garments": float(len(gallery_ids))}
    for k in ks:
        metrics[f"garment_r@{k}"] = float(recall[k])
        metrics[f"chance_r@{k}"] = min(k, len(gallery_ids)) / len(gallery_ids)
        metrics[f"oracle_r@{k}"] = float(oracle[k])
        metrics[f"autoencoder_r@{k}"] = float(roundtrip[k])
    lookbooks_of: dict[str, list[PairRecord]] = {}
    for record in records:
        lookbooks_of.setdefault(record.garment_id, []).append(record)
    other_poses = [[_lookbook(root, other, settings.resolution) for other in lookbooks_of[record.garment_id]
                    if other.lookbook_image != record.lookbook_image] for record in chosen]
    metrics.update(pose_scores(images, lookbooks, other_poses, garments, settings.colour_sigma))
    return ValidationResult(metrics, images, chosen, garments, lookbooks)


def settings_from(config: Any, **changes: Any) -> ValidationSettings:
    """Settings matching a :class:`~fashionshoot.training.config.PhotoshootTrainConfig`: its data
    resolution and slot map and its ``validation`` section (pairs, steps, guidance, seed, prompts),
    with ``changes`` applied."""
    v = config.validation
    values: Mapping[str, Any] = {
        "resolution": tuple(config.data.resolution), "slot_map": dict(config.data.slot_map),
        "num_pairs": v.num_pairs, "steps": v.steps, "guidance_text": v.guidance_text,
        "guidance_garment": v.guidance_garment, "seed": v.seed, "prompts": v.prompts,
    }
    return ValidationSettings(**{**values, **changes})
