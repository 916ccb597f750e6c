"""Training batches: pair records -> tensors the denoiser needs, with a resumable, rank-sharded order.

The collator does all per-sample image work in DataLoader workers: lookbook pixels for the VAE
target, the garment twice (image-encoder pixels for cross-attention, VAE pixels for the reference
path), the slot each garment fills, pose keypoints rescaled to the training resolution (and their
heatmaps at the latent size), caption and confidence weight. The order of a manifest's samples is :class:`EpochBatchSampler`'s, not accelerate's,
so a resumed run can start mid-epoch on exactly the batch the interrupted run would have drawn next;
shards are streamed by :mod:`fashionshoot.training.shard_batches`, which checkpoints its place instead.
:func:`load_pairs` picks the source.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Sampler

from fashionshoot.data.pairs import PairManifestDataset, SampleSpec, read_manifest
from fashionshoot.data.records import PairRecord
from fashionshoot.data.transforms import to_tensor
from fashionshoot.errors import DataError
from fashionshoot.models.pose import pose_maps
from fashionshoot.training.config import DataConfig
from fashionshoot.training.shard_batches import StreamProgress, fit_images, shard_batches, unpack_test_split

if TYPE_CHECKING:
    from fashionshoot.models.garment_adapter import Conditioning


def load_records(config: DataConfig, output_dir: Path) -> tuple[list[PairRecord], Path]:
    """All pair records and the folder their image paths are relative to (synthetic set generated if needed)."""
    if config.manifest:
        path = Path(config.manifest)
        return read_manifest(path), path.parent
    from fashionshoot.data.synthetic import load_synthetic_config, write_synthetic_set

    root = output_dir / "synthetic"
    settings = root / "synthetic.json"
    fresh = settings.is_file() and (root / "pairs.jsonl").is_file() and load_synthetic_config(settings) == config.synthetic
    if not fresh:
        write_synthetic_set(root, config.synthetic, progress=True)
    return read_manifest(root / "pairs.jsonl"), root


@dataclass
class TrainingPairs:
    """A run's pairs: all ``records`` of a manifest (or the synthetic set) under ``root``, read by index; or,
    with ``data.shards``, a stream whose place is ``progress`` (checkpointed per rank) and no records.
    Either way the test split is records on disk (``test_records`` under ``test_root``) for validation."""

    config: DataConfig
    records: list[PairRecord]
    root: Path
    test_records: list[PairRecord]
    test_root: Path
    progress: StreamProgress | None = None

    def fit_images(self, seed: int, limit: int) -> list[Image.Image]:
        """Training images to fit a tiny VAE on."""
        from fashionshoot.pipelines.tiny_pretraining import training_images

        if self.progress is not None:
            return fit_images(self.config, seed, limit)
        return training_images(select(self.records, self.config, self.config.train_split), self.root)[:limit]

    def batches_at(self, collator: PhotoshootCollator, batch_size: int, seed: int, rank: int, world: int,
                   step: int, grad_accum: int) -> tuple[int, Iterator[dict[str, Any]]]:
        """The curriculum stage in force at optimizer ``step`` and this rank's batches from there on."""
        if self.progress is None:
            return stage_batches(self.records, self.root, self.config, collator, batch_size, seed, rank, world,
                                 step, grad_accum)
        index, start, tier = curriculum_stage(self.config, step)
        return index, shard_batches(self.config, index, tier, collator, batch_size, seed, rank, world,
                                    self.progress, (step - start) * grad_accum)


#: Where a shard-streaming run unpacks its test split, under ``output_dir``.
TEST_PAIRS_DIR = "test-pairs"


def load_pairs(config: DataConfig, output_dir: Path) -> TrainingPairs:
    """The run's pairs; generates the synthetic set or unpacks the shards' test split on first use (call on
    the main process first)."""
    if config.shards:
        manifest = unpack_test_split(config, output_dir / TEST_PAIRS_DIR)
        test = read_manifest(manifest)
        if not test:
            raise DataError(f"{config.shards}: no pairs in split {config.test_split!r} at tier {config.tier!r} "
                            f"(min_confidence {config.min_confidence}) to validate on")
        return TrainingPairs(config, [], Path(config.shards), test, manifest.parent,
                             StreamProgress(max(1, config.num_workers)))
    records, root = load_records(config, output_dir)
    return TrainingPairs(config, records, root, select(records, config, config.test_split), root)


def select(records: Sequence[PairRecord], config: DataConfig, split: str, tier: str | None = None) -> list[PairRecord]:
    """The records of ``split`` at ``tier`` (default: the configured one) and confidence; empty is an
    error naming the filter."""
    keep = config.pair_filter(split, tier)
    chosen = [r for r in records if keep.accepts(r)]
    if not chosen:
        raise DataError(f"no pairs in split {split!r} at tier {tier or config.tier!r} (min_confidence "
                        f"{config.min_confidence}) among {len(records)} records")
    return chosen


def category_slot(category: str, slots: Sequence[str], slot_map: Mapping[str, str]) -> int:
    """Index of the outfit slot a garment of ``category`` fills."""
    slot = slot_map.get(category, category)
    if slot not in slots:
        raise DataError(f"category {category!r} maps to no outfit slot (slots: {', '.join(slots)}); "
                        f"add it to data.slot_map")
    return list(slots).index(slot)


def vae_pixels(images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
    """``(N, 3, H, W)`` in ``[-1, 1]`` (the VAE's range), bicubically resized to ``size`` ``(H, W)``."""
    return torch.stack([to_tensor(img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BICUBIC))
                        for img in images])


def keypoints_at(record: PairRecord, lookbook: Image.Image, size: tuple[int, int]) -> np.ndarray | None:
    """The record's keypoints in ``size`` ``(H, W)`` pixels (records store them in the source lookbook's
    pixels); None when it has none."""
    if record.keypoints is None:
        return None
    kp = np.asarray(record.keypoints, dtype=np.float32).copy()
    kp[:, 0] *= size[1] / lookbook.width
    kp[:, 1] *= size[0] / lookbook.height
    return kp


def caption(record: PairRecord) -> str:
    """The record's caption (the scene/style prompt it trains with), ``""`` when it has none."""
    return str(record.metadata.get("caption", ""))


def _box(record: PairRecord, lookbook: Image.Image, size: tuple[int, int]) -> list[float]:
    """The garment box ``(x1, y1, x2, y2)`` in training-resolution pixels; NaNs when the record has none."""
    if record.crop_box is None:
        return [float("nan")] * 4
    x1, y1, x2, y2 = record.crop_box
    sx, sy = size[1] / lookbook.width, size[0] / lookbook.height
    return [x1 * sx, y1 * sy, x2 * sx, y2 * sy]


class PhotoshootCollator:
    """DataLoader ``collate_fn`` for :class:`PairManifestDataset` samples holding PIL images.

    Returns ``lookbook`` ``(B, 3, H, W)`` in ``[-1, 1]``; the garment as the adapter's ``conditioning``
    reads it: ``garment_clip`` (image processor output, cross-attention) and/or ``garment_vae``
    (``(B, 3, H, W)`` in ``[-1, 1]``, reference); ``slot_mask`` ``(B, S)`` with one garment per sample,
    ``keypoints`` (list, ``None`` where missing), ``garment_box`` ``(B, 4)`` (training pixels, NaN rows
    where missing), ``prompts`` (captions, ``""`` where missing), ``weight`` ``(B,)`` and ``pair_ids``.
    With ``latent_size`` ``(h, w)`` also ``pose``: the ``(B, 18, h, w)`` heatmaps the UNet's pose channels
    read (:func:`~fashionshoot.models.pose.pose_maps`), drawn here in the workers, not in the training step.
    """

    def __init__(self, image_processor: Any, slots: Sequence[str], slot_map: Mapping[str, str],
                 resolution: tuple[int, int], conditioning: Conditioning = "both",
                 latent_size: tuple[int, int] | None = None) -> None:
        self.image_processor = image_processor
        self.slots = tuple(slots)
        self.slot_map = dict(slot_map)
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.conditioning = conditioning
        self.latent_size = latent_size

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        records: list[PairRecord] = [s["record"] for s in samples]
        garments = [s["garment"].convert("RGB") for s in samples]
        slot_mask = torch.zeros(len(samples), len(self.slots), dtype=torch.bool)
        for i, record in enumerate(records):
            slot_mask[i, category_slot(record.category, self.slots, self.slot_map)] = True
        garment: dict[str, torch.Tensor] = {}
        if self.conditioning != "reference":
            garment["garment_clip"] = self.image_processor(images=garments, return_tensors="pt").pixel_values
        if self.conditioning != "cross_attention":
            garment["garment_vae"] = vae_pixels(garments, self.resolution)
        keypoints = [keypoints_at(r, s["lookbook"], self.resolution) for r, s in zip(records, samples, strict=True)]
        if self.latent_size is not None:
            garment["pose"] = pose_maps(keypoints, self.resolution, self.latent_size)
        return {
            "lookbook": vae_pixels([s["lookbook"] for s in samples], self.resolution),
            **garment,
            "slot_mask": slot_mask,
            "keypoints": keypoints,
            "garment_box": torch.tensor([_box(r, s["lookbook"], self.resolution) for r, s in zip(records, samples, strict=True)],
                                        dtype=torch.float32),
            "prompts": [caption(r) for r in records],
            "weight": torch.tensor([s["weight"] for s in samples], dtype=torch.float32),
            "pair_ids": [r.pair_id for r in records],
        }


class EpochBatchSampler(Sampler[list[int]]):
    """Full batches of a per-epoch permutation (seeded by ``seed`` and the epoch), this rank's share.

    Each rank takes every ``world``-th batch, so ranks see disjoint data; ``start`` skips batches of
    the current epoch (resume). Incomplete batches are dropped so every rank runs the same steps.
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size, self.batch_size, self.seed, self.rank, self.world = size, batch_size, seed, rank, world
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise DataError(f"{size} training pairs give no full batch of {batch_size} per process on {world} process(es)")

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for b in range(self.start, len(self)):
            first = (b * self.world + self.rank) * self.batch_size
            yield order[first : first + self.batch_size]


def curriculum_stage(config: DataConfig, step: int) -> tuple[int, int, str]:
    """``(stage index, stage start step, tier)`` in force at optimizer step ``step``."""
    stages = config.curriculum or ((0, config.tier),)
    index = max(i for i, (start, _) in enumerate(stages) if start <= step)
    start, tier = stages[index]
    return index, start, tier


def batches_from(loader: DataLoader, sampler: EpochBatchSampler, consumed: int) -> Iterator[dict[str, Any]]:
    """Endless batches, starting after the first ``consumed`` batches of the run (epochs wrap)."""
    epoch, start = divmod(consumed, len(sampler))
    while True:
        sampler.set_position(epoch, start)
        yield from loader
        epoch, start = epoch + 1, 0


def stage_batches(records: Sequence[PairRecord], root: Path, config: DataConfig, collator: PhotoshootCollator,
                  batch_size: int, seed: int, rank: int, world: int, step: int, grad_accum: int,
                  ) -> tuple[int, Iterator[dict[str, Any]]]:
    """The curriculum stage in force at optimizer ``step`` and its batches, positioned at ``step``.

    Each stage has its own epoch order (seeded by ``seed + stage``); entering a stage, or resuming
    inside one, skips the ``(step - stage start) * grad_accum`` batches already drawn from it.
    """
    index, start, tier = curriculum_stage(config, step)
    chosen = select(records, config, config.train_split, tier)
    loader, sampler = train_loader(chosen, root, config, collator, batch_size, seed + index, rank, world)
    return index, batches_from(loader, sampler, (step - start) * grad_accum)


def train_loader(records: Sequence[PairRecord], root: Path, config: DataConfig, collator: PhotoshootCollator,
                 batch_size: int, seed: int, rank: int, world: int) -> tuple[DataLoader, EpochBatchSampler]:
    """A plain DataLoader over ``records`` (deliberately not ``accelerator.prepare``-d, see module doc).

    Its own generator keeps worker seeding from drawing on the global RNG that checkpoints restore.
    """
    dataset = PairManifestDataset(records, root, SampleSpec(weight_power=config.weight_power))
    sampler = EpochBatchSampler(len(dataset), batch_size, seed, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator, num_workers=config.num_workers,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler
