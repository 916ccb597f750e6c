"""WebDataset shards of garment-lookbook pairs: a writer, an index, and a fault-tolerant streaming reader.

Shards are plain POSIX (pax) tars in the WebDataset layout (``<pair_id>.garment.jpg``,
``<pair_id>.lookbook.jpg``, ``<pair_id>.json``), so ``webdataset.WebDataset`` reads them too. Next to
them, ``shards.json`` records each shard's sample, per-tier and per-split counts: readers know the data
size without scanning, skip shards holding no wanted tier or split (the writer gives each split its own
shards), and detect truncated shards (which ``tarfile`` may otherwise end silently). The reader streams
tars sequentially with :mod:`tarfile`, splits shards across ranks and DataLoader workers, and
skips-and-counts bad samples instead of dying mid-epoch.
See docs/pair-format.md.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import re
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from fashionshoot.data.faults import FaultReport
from fashionshoot.data.images import decode_image
from fashionshoot.data.pairs import PairFilter, SampleSpec, check_record, parse_record
from fashionshoot.data.records import KEY_CHARS, TIERS, PairRecord
from fashionshoot.errors import DataError

logger = logging.getLogger(__name__)

INDEX_NAME = "shards.json"
INDEX_FORMAT = "fashionshoot-pair-shards"
INDEX_VERSION = 2
#: Version 1 indexes (no per-shard split counts) are still read; their shards may hold any split.
READABLE_VERSIONS = (1, 2)
#: A valid sample key (used with ``fullmatch``: ``$`` would also match before a trailing newline).
_KEY = re.compile(rf"[{KEY_CHARS}]+")
_ROLES = ("garment", "lookbook")
_MEMBERS = ("json", *_ROLES)


# --------------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    """One shard file: its name (relative to the index folder), sample count, and samples per tier and
    per split (``splits`` is None in a version 1 index, which did not count them)."""

    name: str
    count: int
    tiers: dict[str, int] = field(default_factory=dict)
    splits: dict[str, int] | None = None

    def may_hold(self, select: PairFilter) -> bool:
        """Whether this shard can hold a pair ``select`` accepts (by its tier and split counts)."""
        if not any(self.tiers.get(tier) for tier in select.allowed_tiers):
            return False
        return select.split is None or self.splits is None or bool(self.splits.get(select.split))


@dataclass
class ShardIndex:
    """The ``shards.json`` index: the list of shards of one pair set, in order, with their counts."""

    root: Path
    shards: list[ShardInfo]

    def count(self, tiers: Iterable[str] | None = None) -> int:
        """Samples in the set, or only those whose tier is in ``tiers``."""
        if tiers is None:
            return sum(s.count for s in self.shards)
        wanted = set(tiers)
        return sum(n for s in self.shards for t, n in s.tiers.items() if t in wanted)

    def tier_counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.tiers)
        return {t: total[t] for t in TIERS}

    def split_counts(self) -> dict[str, int]:
        total: Counter = Counter()
        for s in self.shards:
            total.update(s.splits or {})
        return dict(sorted(total.items()))

    def save(self) -> Path:
        path = self.root / INDEX_NAME
        body = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "total": self.count(),
            "tiers": self.tier_counts(),
            "splits": self.split_counts(),
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ShardIndex:
        """Load ``path`` (the index file, or the folder holding ``shards.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"{path}: shard index not found (write shards with write_pair_shards)") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: cannot read shard index ({exc})") from exc
        if not isinstance(body, dict) or body.get("format") != INDEX_FORMAT:
            raise DataError(f"{path}: not a {INDEX_FORMAT} index")
        if body.get("version") not in READABLE_VERSIONS:
            raise DataError(
                f"{path}: index version {body.get('version')!r}, this reader knows {READABLE_VERSIONS}"
            )
        try:
            shards = [ShardInfo(**s) for s in body["shards"]]
        except (KeyError, TypeError) as exc:
            raise DataError(f"{path}: malformed shard list ({exc})") from exc
        return cls(path.parent, shards)


# --------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------


def _image_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _check_key(record: PairRecord, seen: set[str]) -> None:
    """The pair id must be a unique, dot-free sample key (WebDataset splits member names at the first dot)."""
    if not _KEY.fullmatch(record.pair_id):
        raise DataError(f"pair_id {record.pair_id!r}: shard keys may only use letters, digits, '_' and '-'")
    if record.pair_id in seen:
        raise DataError(f"pair_id {record.pair_id!r} appears twice; shard keys must be unique")
    seen.add(record.pair_id)


def _open_shard(path: Path) -> tarfile.TarFile:
    """A pax tar: plain USTAR headers for names up to 100 bytes, a pax header for longer keys (retrieval
    builds ids of ~130 characters), which ``tarfile`` and ``webdataset`` both read."""
    return tarfile.open(path, "w", format=tarfile.PAX_FORMAT)


def write_pair_shards(
    records: Iterable[PairRecord],
    image_root: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    prefix: str = "pairs",
    one_split_per_shard: bool = True,
) -> ShardIndex:
    """Pack records and their image files (bytes copied as-is) into WebDataset tars plus ``shards.json``.

    Image paths are resolved against ``image_root``; a missing image is a :class:`DataError` naming the
    file, as is a record the reader would reject (it would be lost silently at training time). In the
    stored JSON the image fields become the member names (``garment.jpg``), so a record read back from
    a shard says where its images are in that shard. Tars are written under temporary names and renamed,
    an existing ``shards.json`` is removed before the first tar replaces one of its shards, and the new
    index is written last, so an interrupted write (or rewrite) never looks complete. On an error the
    temporary tars are removed; after a rewrite, shards of this ``prefix`` the new index does not list are.

    With ``one_split_per_shard`` (the default) each split fills its own shards (one open tar per split, so
    the records can come in any order): a reader of one split, such as a training stream or the unpacking
    of a test split, then opens only that split's shards. Shards are numbered in the order they are begun.
    """
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    image_root, out_dir = Path(image_root), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[ShardInfo] = []
    filling: dict[str, tuple[ShardInfo, tarfile.TarFile, Path]] = {}  # the open shard of each split (or of all)
    seen: set[str] = set()

    def close(group: str) -> None:
        info, tar, tmp = filling.pop(group)
        tar.close()
        (out_dir / INDEX_NAME).unlink(missing_ok=True)  # the old index must not vouch for new tars
        os.replace(tmp, out_dir / info.name)

    try:
        for record in records:
            check_record(record, f"{out_dir}")
            _check_key(record, seen)
            group = record.split if one_split_per_shard else ""
            if group in filling and filling[group][0].count >= samples_per_shard:
                close(group)
            if group not in filling:
                shards.append(ShardInfo(f"{prefix}-{len(shards):06d}.tar", 0, {}, {}))
                tmp = out_dir / f".{shards[-1].name}.tmp"
                filling[group] = (shards[-1], _open_shard(tmp), tmp)
            info, tar, _ = filling[group]
            _add_sample(tar, record, image_root)
            info.count += 1
            info.tiers[record.tier] = info.tiers.get(record.tier, 0) + 1
            info.splits[record.split] = info.splits.get(record.split, 0) + 1
        for group in list(filling):
            close(group)
    except BaseException:
        _discard(filling.values())
        raise
    index = ShardIndex(out_dir, shards)
    index.save()
    _remove_stale_shards(out_dir, prefix, {info.name for info in shards})
    return index


def _remove_stale_shards(out_dir: Path, prefix: str, current: set[str]) -> None:
    """Delete ``<prefix>-NNNNNN.tar`` files the new index does not list: left by an earlier, larger write
    into the same folder, they would be dead weight that ``webdataset`` globs still read."""
    for path in out_dir.glob(f"{prefix}-*.tar"):
        if path.name not in current and re.fullmatch(rf"{re.escape(prefix)}-\d{{6}}\.tar", path.name):
            path.unlink()


def _add_sample(tar: tarfile.TarFile, record: PairRecord, image_root: Path) -> None:
    """Append one sample's three members; the stored JSON names the image members, not the source paths."""
    stored = {}
    for role in _ROLES:
        source = image_root / getattr(record, f"{role}_image")
        member = f"{role}{source.suffix.lower() or '.img'}"
        _add_member(tar, f"{record.pair_id}.{member}", _image_bytes(source))
        stored[f"{role}_image"] = member
    body = json.dumps(dataclasses.replace(record, **stored).to_dict(), ensure_ascii=False)
    _add_member(tar, f"{record.pair_id}.json", body.encode("utf-8"))


def _discard(open_shards: Iterable[tuple[ShardInfo, tarfile.TarFile, Path]]) -> None:
    """Close and delete the temporary tars of a failed write, so no partial file is left behind."""
    for _, tar, tmp in open_shards:
        try:
            tar.close()
        except (OSError, tarfile.TarError):
            pass  # the write is failing anyway; the file is removed next
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# Partitioning across ranks and workers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardPart:
    """The slice of a shard list one reader handles: whole shards, or every ``every``-th sample of them.

    Splitting by whole shards is free (each reader opens only its own tars). When there are fewer
    shards than parts, every part reads all its shards and keeps sample positions ``offset`` modulo
    ``every``, which is still disjoint and complete. Splits compose: ranks first, then workers.
    """

    shards: tuple[str, ...]
    every: int = 1
    offset: int = 0

    def split(self, part: int, nparts: int) -> ShardPart:
        if not 0 <= part < nparts:
            raise DataError(f"part {part} is outside 0..{nparts - 1}")
        if nparts == 1:
            return self
        if self.every == 1 and len(self.shards) >= nparts:
            return ShardPart(self.shards[part::nparts])
        return ShardPart(self.shards, self.every * nparts, self.offset + part * self.every)

    def keeps(self, position: int) -> bool:
        return position % self.every == self.offset


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` from an initialised ``torch.distributed`` (as accelerate sets up), else from
    the ``RANK`` / ``WORLD_SIZE`` variables a launcher exports, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


# --------------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------------


@dataclass
class _RawSample:
    shard: str
    key: str
    members: dict[str, bytes]

    def member(self, role: str) -> str | None:
        """The member name holding ``role`` (``json``; ``garment.jpg`` for ``garment``), or None."""
        return next((m for m in self.members if m == role or m.startswith(f"{role}.")), None)

    def missing(self) -> list[str]:
        return [role for role in _MEMBERS if self.member(role) is None]


def _read_tar(path: Path, name: str, faults: FaultReport) -> Iterator[_RawSample]:
    """Group consecutive tar members by key; on a read error stop, keeping the last sample if complete."""
    current: _RawSample | None = None
    try:
        with tarfile.open(path, "r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, member = info.name.rpartition("/")[2].partition(".")
                data = tar.extractfile(info).read()
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = _RawSample(name, key, {})
                current.members[member] = data
    except (tarfile.TarError, EOFError, OSError) as exc:
        if current is not None and current.missing():
            current = None  # a partial sample: counted by the caller's truncation check
        logger.debug("%s: read stopped by %s: %s", name, exc.__class__.__name__, exc)
    if current is not None:
        yield current


class PairShardStream(IterableDataset):
    """Stream pair samples from shards: filtered, optionally shuffled, disjoint across ranks and workers.

    Each sample is ``{"garment", "lookbook", "record", "weight"}`` shaped by ``spec`` (resize,
    transform, confidence-weight exponent). ``rank``/``world_size`` default to :func:`distributed_context`
    at construction, so build the stream after ``Accelerator()``. Do not also pass the DataLoader
    through ``accelerator.prepare``: accelerate would shard (or dispatch from rank 0) the already-split
    stream and drop data; move batches to the device yourself.

    Bad samples are skipped and counted in :attr:`faults` (reset each epoch) and summarised in the log
    when iteration ends: corrupt image, missing member, malformed JSON or record, truncated or missing
    shard. With DataLoader workers each worker logs its own summary; :attr:`faults` on the main object
    is filled only when iterating in-process (``num_workers=0``).
    """

    def __init__(
        self,
        source: str | Path | ShardIndex,
        *,
        select: PairFilter | None = None,
        spec: SampleSpec | None = None,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.index = source if isinstance(source, ShardIndex) else ShardIndex.load(source)
        self.select = select or PairFilter()
        self.spec = spec or SampleSpec()
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        context = distributed_context()
        self.rank = context[0] if rank is None else rank
        self.world_size = context[1] if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise DataError(f"rank {self.rank} is outside 0..{self.world_size - 1}")
        self.epoch = 0
        self.faults = FaultReport()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch``; call on every rank before each epoch, as with ``DistributedSampler``."""
        self.epoch = epoch

    def expected_count(self) -> int:
        """Samples of the selected tiers in the whole set (all ranks), before confidence/split/category filters."""
        return self.index.count(self.select.allowed_tiers)

    def _part(self, worker: int, num_workers: int) -> ShardPart:
        """This reader's slice (the same shard order on every rank, so slices are disjoint)."""
        names = [s.name for s in self.index.shards if s.may_hold(self.select)]
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(names)
        return ShardPart(tuple(names)).split(self.rank, self.world_size).split(worker, num_workers)

    def _raw(self, part: ShardPart) -> Iterator[_RawSample]:
        counts = {s.name: s.count for s in self.index.shards}
        position = 0
        for name in part.shards:
            path = self.index.root / name
            if not path.is_file():
                self.faults.skip("missing shard", f"{path} ({counts[name]} samples)")
                position += counts[name]
                continue
            seen = whole = 0  # samples begun; samples with every member (a cut one is counted as missing one)
            for raw in _read_tar(path, name, self.faults):
                seen += 1
                whole += not raw.missing()
                if part.keeps(position):
                    yield raw
                position += 1
            if seen < counts[name]:
                self.faults.skip("truncated shard", f"{path} ({whole} of {counts[name]} samples readable)")
                position += counts[name] - seen

    def _record(self, raw: _RawSample) -> PairRecord | None:
        where = f"{raw.shard}#{raw.key}"
        missing = raw.missing()
        if missing:
            self.faults.skip("missing member", f"{where} (no {', '.join(missing)})")
            return None
        try:
            return parse_record(json.loads(raw.members["json"]), f"{where}.json")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self.faults.skip("malformed json", f"{where}.json ({exc})")
        except DataError as exc:
            self.faults.skip("malformed record", str(exc))
        return None

    def _sample(self, raw: _RawSample, record: PairRecord) -> dict[str, Any] | None:
        images = []
        for role in _ROLES:
            member = raw.member(role)
            try:
                images.append(decode_image(raw.members[member], f"{raw.shard}#{raw.key}.{member}"))
            except DataError as exc:
                self.faults.skip("corrupt image", str(exc))
                return None
        return self.spec.sample(record, *images)

    def _shuffled(self, items: Iterator[Any], rng: random.Random) -> Iterator[Any]:
        """Reservoir-style buffer; holds encoded samples so a large buffer stays cheap in memory."""
        if self.shuffle_buffer <= 1:
            yield from items
            return
        buffer: list[Any] = []
        for item in items:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            i = rng.randrange(len(buffer))
            yield buffer[i]
            buffer[i] = item
        rng.shuffle(buffer)
        yield from buffer

    def positioned(self, worker: int = 0, num_workers: int = 1, skip: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """This epoch's ``(position, sample)`` pairs for worker ``worker`` of ``num_workers`` on this rank.

        A position numbers the worker's selected samples in their shuffled order, so it names the same
        sample in every run with the same data, seed, epoch, rank and worker; a sample skipped as corrupt
        keeps its number. The first ``skip`` positions are passed over without decoding their images: a
        resumed training run continues exactly where the interrupted one stopped
        (:mod:`fashionshoot.training.shard_batches`). :attr:`faults` then counts only what is found after
        that place (the interrupted run counted the rest), however far ahead the shuffle buffer has read.
        """
        if not 0 <= worker < num_workers:
            raise DataError(f"worker {worker} is outside 0..{num_workers - 1}")
        self.faults = FaultReport()
        rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
        selected = (
            (raw, record)
            for raw in self._raw(self._part(worker, num_workers))
            if (record := self._record(raw)) is not None and self.select.accepts(record)
        )
        delivered = 0
        for position, (raw, record) in enumerate(self._shuffled(selected, rng)):
            if position < skip:
                if position == skip - 1:  # where the interrupted run stood when it handed this sample over
                    self.faults = FaultReport()
                continue
            sample = self._sample(raw, record)
            if sample is not None:
                delivered += 1
                yield position, sample
        log = logger.warning if self.faults.total else logger.info
        log(
            "pair shards rank %d worker %d epoch %d: %d samples delivered; %s",
            self.rank,
            worker,
            self.epoch,
            delivered,
            self.faults.summary(),
        )

    def unpack(self, out_dir: str | Path) -> Path:
        """Write this reader's selected pairs (of its rank's part, unshuffled) as files plus a ``pairs.jsonl``
        manifest under ``out_dir``; returns the manifest path.

        For the part of a streamed set that needs random access, such as a training run's test split. Image
        bytes are copied as stored (``images/<pair_id>.garment.jpg``, ...) after checking that they decode;
        bad samples are skipped and counted in :attr:`faults` as when streaming. The folder is filled under
        a temporary name and renamed, replacing ``out_dir``, so an interrupted unpack never looks complete.
        """
        from fashionshoot.data.pairs import write_manifest

        out_dir = Path(out_dir)
        building = out_dir.with_name(f".{out_dir.name}.incomplete")
        shutil.rmtree(building, ignore_errors=True)
        (building / "images").mkdir(parents=True)
        self.faults = FaultReport()
        records = []
        for raw in self._raw(self._part(0, 1)):
            record = self._record(raw)
            if record is None or not self.select.accepts(record) or self._sample(raw, record) is None:
                continue
            stored = {}
            for role in _ROLES:
                member = raw.member(role)
                (building / "images" / f"{raw.key}.{member}").write_bytes(raw.members[member])
                stored[f"{role}_image"] = f"images/{raw.key}.{member}"
            records.append(dataclasses.replace(record, **stored))
        write_manifest(records, building / "pairs.jsonl")
        shutil.rmtree(out_dir, ignore_errors=True)
        building.rename(out_dir)
        (logger.warning if self.faults.total else logger.info)(
            "unpacked %d pairs into %s; %s", len(records), out_dir, self.faults.summary())
        return out_dir / "pairs.jsonl"

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, sample in self.positioned(worker, num_workers):
            yield sample
