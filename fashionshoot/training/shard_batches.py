"""Training batches streamed from WebDataset pair shards (``data.shards``), resumable to the exact sample.

A manifest run's data position is a function of the step (:class:`~fashionshoot.training.data.EpochBatchSampler`
has random access). A shard stream has none, so here the position is state, saved per rank in every
checkpoint (:class:`StreamProgress`):

* each DataLoader worker reads an endless sequence of epochs of its own part of the shards
  (:meth:`PairShardStream.positioned <fashionshoot.data.shards.PairShardStream.positioned>`: reshuffled
  shard order and shuffle buffer per epoch), so ranks never run dry at different steps;
* a DataLoader takes batches from its workers strictly in turn (it keeps them in order, and an endless
  worker never drops out of the rotation), and every batch says which worker made it and the position
  after its last sample;
* the progress keeps, per worker, the position after the last batch the loop *took* (batches prefetched
  but not trained on do not count) and how many batches it took. On resume each worker starts at its
  position, passing over the samples before it without decoding their images, and the worker ids are
  rotated by ``batches % workers`` so that the first batch comes from the worker whose turn it was.

Samples skipped as bad (corrupt image, malformed record, truncated shard) are logged by the worker as they
happen and counted by :meth:`StreamProgress.skipped` for the run's log. The counts are part of the place: a
resumed run's counts continue the interrupted run's (faults before the place are neither decoded nor
counted again), so a run's report is the same however often it was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from fashionshoot.data.pairs import SampleSpec
from fashionshoot.data.shards import INDEX_NAME, PairShardStream, ShardIndex
from fashionshoot.errors import ConfigError, DataError
from fashionshoot.training.config import DataConfig

logger = logging.getLogger(__name__)

#: The key a streamed sample (and its batch) carries its :class:`StreamMark` under.
MARK_KEY = "stream"


@dataclass(frozen=True)
class StreamMark:
    """Where a sample came from: the (logical) worker, its epoch, the position after the sample, and the
    worker's skipped-sample counts so far in this curriculum stage (all its epochs)."""

    worker: int
    epoch: int
    next_position: int
    skipped: dict[str, int]


@dataclass
class StreamProgress:
    """One rank's place in its shard stream: the curriculum stage, the batches taken in it, each worker's
    ``[epoch, next position]`` and the bad samples each worker skipped up to it in this stage, and those
    skipped in earlier stages. Saved per rank in checkpoints (``state_dict``/``load_state_dict``)."""

    workers: int
    stage: int = 0
    batches: int = 0
    positions: list[list[int]] = field(default_factory=list)
    worker_skipped: list[dict[str, int]] = field(default_factory=list)
    earlier_skipped: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.positions:
            self._start_stage()

    def _start_stage(self) -> None:
        self.positions = [[0, 0] for _ in range(self.workers)]
        self.worker_skipped = [{} for _ in range(self.workers)]

    def enter(self, stage: int) -> None:
        """Start ``stage`` at the beginning of its stream (unless this progress is already inside it)."""
        if stage != self.stage:
            self.earlier_skipped = dict(self.skipped())
            self.stage, self.batches = stage, 0
            self._start_stage()

    def took(self, mark: StreamMark) -> None:
        """The loop took a batch whose last sample is ``mark``."""
        self.batches += 1
        self.positions[mark.worker] = [mark.epoch, mark.next_position]
        self.worker_skipped[mark.worker] = mark.skipped

    def skipped(self) -> Counter:
        """Bad samples skipped up to the batches taken, by reason, over the whole run (resumes included)."""
        total = Counter(self.earlier_skipped)
        for counts in self.worker_skipped:
            total.update(counts)
        return total

    def state_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "stage": self.stage, "batches": self.batches, "positions": self.positions,
                "worker_skipped": self.worker_skipped, "earlier_skipped": self.earlier_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["workers"] != self.workers:
            raise ConfigError(
                f"the checkpoint's shard stream was read by {state['workers']} DataLoader worker(s) per process, "
                f"this run has {self.workers}: each worker reads its own part of the shards, so resume with as many "
                f"(data.num_workers={state['workers']}) to continue the same data order")
        self.stage, self.batches = int(state["stage"]), int(state["batches"])
        self.positions = [[int(e), int(p)] for e, p in state["positions"]]
        self.worker_skipped = [dict(counts) for counts in state["worker_skipped"]]
        self.earlier_skipped = dict(state["earlier_skipped"])

    def to(self, device: Any) -> StreamProgress:  # per-rank checkpoint objects are moved to the device
        return self


class EndlessShardStream(IterableDataset):
    """Every worker's endless epochs of ``stream``, marked, starting where ``progress`` says (see module doc)."""

    def __init__(self, stream: PairShardStream, progress: StreamProgress) -> None:
        self.stream = stream
        self.workers, self.batches = progress.workers, progress.batches
        self.positions = [list(p) for p in progress.positions]
        self.skipped = [dict(counts) for counts in progress.worker_skipped]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, count = (info.id, info.num_workers) if info is not None else (0, 1)
        if count != self.workers:
            raise DataError(f"stream laid out for {self.workers} workers, read by {count}")
        worker = (physical + self.batches) % count
        epoch, skip = self.positions[worker]
        before = Counter(self.skipped[worker])  # up to the place; the stream counts what it finds after it
        while True:
            self.stream.set_epoch(epoch)
            delivered = 0
            for position, sample in self.stream.positioned(worker, count, skip):
                delivered += 1
                yield {**sample, MARK_KEY: StreamMark(worker, epoch, position + 1,
                                                      dict(before + self.stream.faults.counts))}
            if not delivered and not skip:
                raise DataError(
                    f"{self.stream.index.root}: rank {self.stream.rank} worker {worker} found no usable sample in "
                    f"epoch {epoch} ({self.stream.select}; {self.stream.faults.summary()}); fewer workers or "
                    "processes, or a wider filter, would give every reader some")
            before += self.stream.faults.counts
            epoch, skip = epoch + 1, 0


class MarkedCollator:
    """Collate with the pair collator and keep the batch's last :class:`StreamMark` (a batch comes from one worker)."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {**self.collate(samples), MARK_KEY: samples[-1][MARK_KEY]}


def train_stream(config: DataConfig, tier: str, seed: int, rank: int = 0, world: int = 1) -> PairShardStream:
    """The training pairs of ``tier`` in ``data.shards``: shuffled shard order and buffer, this rank's part."""
    return PairShardStream(
        Path(config.shards),
        select=config.pair_filter(config.train_split, tier),
        spec=SampleSpec(weight_power=config.weight_power),
        shuffle_shards=True, shuffle_buffer=config.shuffle_buffer, seed=seed, rank=rank, world_size=world,
    )


def shard_batches(config: DataConfig, stage: int, tier: str, collate: Any, batch_size: int, seed: int, rank: int,
                  world: int, progress: StreamProgress, expected_batches: int) -> Iterator[dict[str, Any]]:
    """Endless batches of curriculum ``stage`` (pairs of ``tier``) for this rank, continuing ``progress``.

    ``expected_batches`` is what the stage has drawn so far by the step count; a progress inside the stage
    that disagrees is refused (it belongs to another run) rather than silently trained from.
    """
    progress.enter(stage)
    if progress.batches != expected_batches:
        raise DataError(f"the shard stream's saved progress has {progress.batches} batches in stage {stage}, "
                        f"the step count says {expected_batches}: the checkpoint is not this run's")
    stream = train_stream(config, tier, seed + stage, rank, world)
    if rank == 0:
        _warn_if_readers_share_shards(stream, stage, world, max(1, config.num_workers))
    dataset = EndlessShardStream(stream, progress)
    loader = DataLoader(dataset, batch_size=batch_size, drop_last=True, collate_fn=MarkedCollator(collate),
                        num_workers=config.num_workers)
    return _taken(loader, progress)


def _warn_if_readers_share_shards(stream: PairShardStream, stage: int, world: int, workers: int) -> None:
    """Fewer shards than readers still works (sample-level split) but reads shared shards' bytes repeatedly."""
    shards = sum(shard.may_hold(stream.select) for shard in stream.index.shards)
    if shards < world * workers:
        logger.warning(
            "%s: %d shard(s) hold curriculum stage %d's pairs (%s) for %d readers (%d process(es) x %d "
            "DataLoader worker(s)): readers share shards, each reading all of a shared shard's bytes to keep "
            "its share of the samples; write the pairs into at least %d shards (a smaller samples_per_shard)",
            stream.index.root, shards, stage, stream.select, world * workers, world, workers, world * workers)


def _taken(loader: DataLoader, progress: StreamProgress) -> Iterator[dict[str, Any]]:
    for batch in loader:
        progress.took(batch.pop(MARK_KEY))
        yield batch


def fit_images(config: DataConfig, seed: int, limit: int) -> list[Image.Image]:
    """Up to ``limit`` training images (product shots and lookbooks) from the start of the shuffled stream:
    what a tiny VAE is fitted on when the pairs are only in shards (no pass over the whole set)."""
    images: list[Image.Image] = []
    for sample in train_stream(config, config.tier, seed):
        images += [sample["garment"].convert("RGB"), sample["lookbook"].convert("RGB")]
        if len(images) >= limit:
            break
    return images[:limit]


def unpack_test_split(config: DataConfig, out_dir: Path) -> Path:
    """The test split of ``data.shards`` as a manifest under ``out_dir`` (unpacked once, reused while the
    shard index and the filter are the same): validation draws pairs by index, which a stream cannot."""
    selection = config.pair_filter(config.test_split)
    index = ShardIndex.load(config.shards)
    source = {"shards": str(index.root.resolve()), "filter": repr(selection),
              "index": hashlib.sha256((index.root / INDEX_NAME).read_bytes()).hexdigest()}
    marker = out_dir / "source.json"
    manifest = out_dir / "pairs.jsonl"
    if manifest.is_file() and marker.is_file() and json.loads(marker.read_text()) == source:
        return manifest
    manifest = PairShardStream(index, select=selection, rank=0, world_size=1).unpack(out_dir)
    marker.write_text(json.dumps(source) + "\n")
    return manifest
