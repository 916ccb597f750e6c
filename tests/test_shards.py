"""Pair shards: writer + index, streaming reader, rank/worker partitioning, shuffling, injected faults."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable
from itertools import product
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import SHARD_SET_SIZE

from fashionshoot.data.pairs import PairFilter, SampleSpec, collate_pairs
from fashionshoot.data.records import PairRecord
from fashionshoot.data.shards import (
    INDEX_NAME,
    PairShardStream,
    ShardIndex,
    ShardPart,
    write_pair_shards,
)
from fashionshoot.errors import DataError

N_PAIRS = SHARD_SET_SIZE  # the ``pairs`` / ``shard_dir`` fixtures (tests/conftest.py)


def ids(stream: PairShardStream) -> list[str]:
    return [sample["record"].pair_id for sample in stream]


def all_ids(*exclude: str) -> set[str]:
    return {f"p{i:04d}" for i in range(N_PAIRS)} - set(exclude)


def test_writer_layout_and_index(shard_dir: Path, pairs: list[PairRecord]) -> None:
    index = ShardIndex.load(shard_dir)
    assert [s.name for s in index.shards] == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    assert [s.count for s in index.shards] == [4, 4, 4]
    assert index.count() == 12 and index.count(["high", "medium"]) == 8
    assert index.tier_counts() == {"high": 4, "medium": 4, "low": 4}
    body = json.loads((shard_dir / INDEX_NAME).read_text())
    assert body["total"] == 12 and body["shards"][0]["tiers"] == {"high": 2, "medium": 1, "low": 1}
    with tarfile.open(shard_dir / "pairs-000000.tar") as tar:
        assert tar.getnames()[:6] == [
            "p0000.garment.jpg", "p0000.lookbook.jpg", "p0000.json",
            "p0001.garment.png", "p0001.lookbook.png", "p0001.json",
        ]  # fmt: skip
    assert not [p for p in shard_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_each_split_fills_its_own_shards_and_a_split_reader_opens_only_those(tmp_path: Path,
                                                                            pairs: list[PairRecord]) -> None:
    """The records come with splits interleaved (p0004 and p0009 are "val"); with two shards of train pairs
    deleted, a reader of the val split must not notice (it never opens them)."""
    out = tmp_path / "by-split"
    index = write_pair_shards(pairs, tmp_path / "images", out, samples_per_shard=4)
    assert [(s.count, s.splits) for s in index.shards] == [(4, {"train": 4}), (2, {"val": 2}), (4, {"train": 4}),
                                                           (2, {"train": 2})]
    body = json.loads((out / INDEX_NAME).read_text())
    assert body["version"] == 2 and body["splits"] == {"train": 10, "val": 2}
    assert sorted(ids(PairShardStream(out))) == sorted(all_ids())
    for shard in ("pairs-000000.tar", "pairs-000002.tar"):
        (out / shard).unlink()
    val = PairShardStream(out, select=PairFilter(split="val"))
    assert ids(val) == ["p0004", "p0009"] and val.faults.total == 0
    assert PairShardStream(out, select=PairFilter(split="val")).unpack(tmp_path / "val").is_file()

    body["version"] = 1  # an index from before split counts: any shard may hold any split
    for shard in body["shards"]:
        del shard["splits"]
    (out / INDEX_NAME).write_text(json.dumps(body))
    old = PairShardStream(out, select=PairFilter(split="val"))
    assert ids(old) == ["p0004", "p0009"] and dict(old.faults.counts) == {"missing shard": 2}


def test_shards_are_plain_webdataset(shard_dir: Path) -> None:
    urls = [str(p) for p in sorted(shard_dir.glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == sorted(all_ids())
    assert set(samples[1]) >= {"garment.png", "lookbook.png", "json"}
    stored = json.loads(samples[1]["json"])
    assert stored["garment_image"] == "garment.png" and stored["pair_id"] == "p0001"


def test_writer_errors(tmp_path: Path, pairs: list[PairRecord]) -> None:
    images, out = tmp_path / "images", tmp_path / "out"
    for key in ("a.b", "p9\n", "a/b"):
        bad_key = PairRecord(**{**pairs[0].to_dict(), "pair_id": key})
        with pytest.raises(DataError, match=f"{key!r}: shard keys may only use".replace("\\", "\\\\")):
            write_pair_shards([bad_key], images, out)
    with pytest.raises(DataError, match="appears twice"):
        write_pair_shards([pairs[0], pairs[0]], images, out)
    (images / pairs[2].lookbook_image).unlink()
    with pytest.raises(DataError, match=f"{images / pairs[2].lookbook_image}: image file not found"):
        write_pair_shards(pairs, images, out)
    assert not (out / INDEX_NAME).exists()  # an interrupted write has no index


def test_writer_refuses_records_the_stream_would_skip(tmp_path: Path, pairs: list[PairRecord]) -> None:
    """NaN or ragged keypoints used to be written, then dropped by the reader as "malformed record"."""
    images, out = tmp_path / "images", tmp_path / "out"
    nan_keypoints = dataclasses.replace(pairs[3], keypoints=[[math.nan, 1.0, 1.0]] + [[1.0, 1.0, 1.0]] * 17)
    ragged = dataclasses.replace(pairs[3], keypoints=[[1.0, 2.0, 1.0], [1.0, 2.0]])
    mutated = dataclasses.replace(pairs[3])
    mutated.crop_box = (0.0, 0.0, math.inf, 1.0)
    for bad, message in ((nan_keypoints, "keypoint row 0"), (ragged, "keypoint row 1"), (mutated, "crop_box")):
        with pytest.raises(DataError, match=message) as err:
            write_pair_shards([*pairs[:3], bad], images, out, samples_per_shard=2)
        assert f"{out}: pair 'p0003'" in str(err.value)
        assert [p.name for p in out.iterdir()] == ["pairs-000000.tar"]  # no index, no temporary tar


def test_a_failed_rewrite_never_looks_complete(tmp_path: Path, pairs: list[PairRecord]) -> None:
    """Rewriting a shard folder and failing midway once left the old shards.json vouching for a mix of new
    and old tars, which streamed without a single fault."""
    images, out = tmp_path / "images", tmp_path / "out"
    write_pair_shards(pairs, images, out, samples_per_shard=4, one_split_per_shard=False)
    renamed = [dataclasses.replace(r, pair_id=f"new{r.pair_id}") for r in pairs]
    (images / renamed[6].garment_image).unlink()  # the write fails in the second shard
    with pytest.raises(DataError, match="image file not found"):
        write_pair_shards(renamed, images, out, samples_per_shard=4, one_split_per_shard=False)
    assert sorted(p.name for p in out.iterdir()) == ["pairs-000000.tar", "pairs-000001.tar", "pairs-000002.tar"]
    with pytest.raises(DataError, match="shard index not found"):
        PairShardStream(out)
    (images / renamed[6].garment_image).write_bytes((images / renamed[5].garment_image).read_bytes())
    write_pair_shards(renamed, images, out, samples_per_shard=4, one_split_per_shard=False)
    assert sorted(ids(PairShardStream(out))) == sorted(r.pair_id for r in renamed)
    (out / "notes.tar").write_bytes(b"")  # not a shard name: never touched
    write_pair_shards(renamed, images, out, samples_per_shard=len(renamed), one_split_per_shard=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.tar", "pairs-000000.tar", "shards.json"]
    assert sorted(ids(PairShardStream(out))) == sorted(r.pair_id for r in renamed)


def test_long_pair_ids_are_written_read_and_resumed(tmp_path: Path, pairs: list[PairRecord]) -> None:
    """USTAR names stop at 100 bytes (``p...p.lookbook.jpg`` at an 88-character id); retrieval builds ids
    of ~130 characters. Pax headers carry them; the reader's positions and truncation check still hold."""
    long = [dataclasses.replace(r, pair_id=f"{r.pair_id}-" + "x" * (80 + 10 * i)) for i, r in enumerate(pairs)]
    out = tmp_path / "long"
    write_pair_shards(long, tmp_path / "images", out, samples_per_shard=4, one_split_per_shard=False)
    expected = sorted(r.pair_id for r in long)
    assert sorted(ids(PairShardStream(out))) == expected and len(expected[-1]) > 190
    assert sorted(s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")),
                                                       shardshuffle=False)) == expected

    def run(skip: int = 0) -> list[tuple[int, str]]:
        stream = PairShardStream(out, shuffle_shards=True, shuffle_buffer=3, seed=1, rank=0, world_size=1)
        return [(p, s["record"].pair_id) for p, s in stream.positioned(0, 1, skip)]

    full = run()
    assert run(skip=5) == full[5:]
    truncate_inside(out / "pairs-000001.tar", f"{long[6].pair_id}.garment.jpg", True)  # inside its pax header
    stream = PairShardStream(out)
    assert sorted(ids(stream)) == sorted(set(expected) - {long[6].pair_id, long[7].pair_id})
    assert dict(stream.faults.counts) == {"truncated shard": 1}


def test_index_errors(tmp_path: Path, shard_dir: Path) -> None:
    with pytest.raises(DataError, match="shard index not found"):
        PairShardStream(tmp_path)
    (shard_dir / INDEX_NAME).write_text('{"format": "fashionshoot-pair-shards", "version": 3}')
    with pytest.raises(DataError, match=r"index version 3, this reader knows \(1, 2\)"):
        ShardIndex.load(shard_dir)
    (shard_dir / INDEX_NAME).write_text('{"format": "something-else"}')
    with pytest.raises(DataError, match="not a fashionshoot-pair-shards index"):
        ShardIndex.load(shard_dir / INDEX_NAME)


def test_stream_reads_everything_with_resize_and_weights(shard_dir: Path, pairs: list[PairRecord]) -> None:
    stream = PairShardStream(shard_dir, spec=SampleSpec(size=(12, 8), weight_power=2.0))
    samples = list(stream)
    assert [s["record"].pair_id for s in samples] == sorted(all_ids())
    assert all(s["garment"].size == (12, 8) and s["lookbook"].size == (12, 8) for s in samples)
    by_id = {r.pair_id: r for r in pairs}
    for s in samples:
        expected = by_id[s["record"].pair_id]
        assert s["weight"] == pytest.approx(expected.confidence**2)
        assert s["record"].keypoints == expected.keypoints and s["record"].scores == expected.scores
    assert stream.faults.total == 0


def test_stream_filters(shard_dir: Path) -> None:
    nested = PairShardStream(shard_dir, select=PairFilter("medium"))
    assert ids(nested) == sorted(f"p{i:04d}" for i in range(N_PAIRS) if i % 3 != 2)
    assert nested.expected_count() == 8
    exact = PairShardStream(shard_dir, select=PairFilter("low", nested=False, min_confidence=0.5))
    assert ids(exact) == ["p0008", "p0011"]


def test_shuffling_is_seeded_per_epoch_and_complete(shard_dir: Path) -> None:
    def order(epoch: int, seed: int = 0) -> list[str]:
        stream = PairShardStream(shard_dir, shuffle_shards=True, shuffle_buffer=5, seed=seed)
        stream.set_epoch(epoch)
        return ids(stream)

    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(all_ids())
    assert len({tuple(order(e)) for e in range(4)}) > 1
    assert order(0, seed=1) != order(0)


@pytest.mark.parametrize("world_size", [2, 3, 5])
@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_are_disjoint_and_complete(shard_dir: Path, world_size: int, shuffle: bool) -> None:
    """3 shards: world 2 and 3 split whole shards; world 5 falls back to splitting samples by position."""
    seen = [
        set(ids(PairShardStream(shard_dir, rank=r, world_size=world_size, shuffle_shards=shuffle, seed=3)))
        for r in range(world_size)
    ]
    assert set().union(*seen) == all_ids()
    assert sum(len(s) for s in seen) == N_PAIRS


def test_shard_part_split_is_a_partition() -> None:
    """Every (shards, ranks, workers) combination covers each sample position exactly once."""
    for n_shards, world, workers in product(range(6), range(1, 4), range(1, 4)):
        shards = tuple(f"s{i}" for i in range(n_shards))
        positions = [(s, k) for s in shards for k in range(3)]  # 3 samples per shard, global order
        owners = []
        for rank, worker in product(range(world), range(workers)):
            part = ShardPart(shards).split(rank, world).split(worker, workers)
            mine = [p for p in positions if p[0] in part.shards]
            owners += [p for i, p in enumerate(mine) if part.keeps(i)]
        assert sorted(owners) == sorted(positions), (n_shards, world, workers)
    with pytest.raises(DataError, match="outside"):
        ShardPart(("a",)).split(2, 2)


def test_dataloader_workers_are_disjoint(shard_dir: Path) -> None:
    seen: list[str] = []
    for rank in range(2):
        stream = PairShardStream(shard_dir, rank=rank, world_size=2, spec=SampleSpec(size=(8, 8)))
        loader = torch.utils.data.DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_pairs)
        seen += [r.pair_id for batch in loader for r in batch["record"]]
    assert sorted(seen) == sorted(all_ids())


# --------------------------------------------------------------------------------------------------
# Faults: each injected fault is skipped, counted exactly, and costs no other sample.
# --------------------------------------------------------------------------------------------------


def rewrite_tar(path: Path, edit: Callable[[str, bytes], bytes | None]) -> None:
    """Rewrite a shard, replacing each member's bytes by ``edit(name, data)`` (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(info.name, tar.extractfile(info).read()) for info in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            new = edit(name, data)
            if new is not None:
                info = tarfile.TarInfo(name)
                info.size = len(new)
                tar.addfile(info, io.BytesIO(new))


def replace_member(target: str, new: bytes | None) -> Callable[[str, bytes], bytes | None]:
    return lambda name, data: new if name == target else data


def bad_keypoints(name: str, data: bytes) -> bytes:
    if name != "p0006.json":
        return data
    return json.dumps({**json.loads(data), "keypoints": [[1.0, 2.0]]}).encode()


def truncate_inside(path: Path, member: str, into_header: bool) -> None:
    """Cut a shard inside ``member``'s data, or inside its header (where tarfile stops without an error)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    cut = info.offset + 100 if into_header else info.offset_data + 10
    path.write_bytes(path.read_bytes()[:cut])


FAULTS = {
    "corrupt image": (lambda d: rewrite_tar(d / "pairs-000000.tar", replace_member("p0001.lookbook.png", b"\x89PNG..")), {"p0001"}),
    "missing member": (lambda d: rewrite_tar(d / "pairs-000001.tar", replace_member("p0005.garment.png", None)), {"p0005"}),
    "malformed json": (lambda d: rewrite_tar(d / "pairs-000002.tar", replace_member("p0010.json", b'{"pair_id": ')), {"p0010"}),
    "malformed record": (lambda d: rewrite_tar(d / "pairs-000001.tar", bad_keypoints), {"p0006"}),
    "truncated shard": (lambda d: truncate_inside(d / "pairs-000001.tar", "p0006.lookbook.jpg", False), {"p0006", "p0007"}),
    "missing shard": (lambda d: (d / "pairs-000002.tar").unlink(), {"p0008", "p0009", "p0010", "p0011"}),
}  # fmt: skip


@pytest.mark.parametrize("reason", sorted(FAULTS))
def test_each_fault_is_skipped_and_counted(shard_dir: Path, reason: str) -> None:
    inject, lost = FAULTS[reason]
    inject(shard_dir)
    stream = PairShardStream(shard_dir)
    assert set(ids(stream)) == all_ids(*lost)
    assert dict(stream.faults.counts) == {reason: 1}


def test_wrongly_typed_record_fields_are_skipped_as_malformed_records(shard_dir: Path) -> None:
    """A "high" confidence or a non-numeric box once raised a bare ValueError that ended the stream."""
    def edit(name: str, data: bytes) -> bytes:
        changes = {"p0001.json": {"confidence": "high"}, "p0002.json": {"crop_box": [0, 0, 4, "x"]},
                   "p0003.json": {"rank": "first"}}.get(name)
        return data if changes is None else json.dumps({**json.loads(data), **changes}).encode()

    rewrite_tar(shard_dir / "pairs-000000.tar", edit)
    stream = PairShardStream(shard_dir)
    assert set(ids(stream)) == all_ids("p0001", "p0002", "p0003")
    assert dict(stream.faults.counts) == {"malformed record": 3}
    assert "pairs-000000.tar#p0001.json: pair 'p0001': confidence 'high'" in stream.faults.summary()


def test_a_sample_cut_after_its_first_member_is_one_missing_member_not_a_readable_sample(shard_dir: Path) -> None:
    truncate_inside(shard_dir / "pairs-000000.tar", "p0002.lookbook.jpg", True)  # p0002's garment is whole
    stream = PairShardStream(shard_dir)
    assert set(ids(stream)) == all_ids("p0002", "p0003")
    assert dict(stream.faults.counts) == {"missing member": 1, "truncated shard": 1}
    assert "2 of 4 samples readable" in stream.faults.summary()


def test_truncation_inside_a_header_is_caught_by_the_index(shard_dir: Path) -> None:
    truncate_inside(shard_dir / "pairs-000000.tar", "p0002.garment.jpg", True)
    stream = PairShardStream(shard_dir)
    assert set(ids(stream)) == all_ids("p0002", "p0003")
    assert dict(stream.faults.counts) == {"truncated shard": 1}
    assert "2 of 4 samples readable" in stream.faults.summary()


def test_all_faults_together_and_log_summary(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    for reason in ("corrupt image", "missing member", "malformed json", "truncated shard"):
        FAULTS[reason][0](shard_dir)
    stream = PairShardStream(shard_dir)
    assert set(ids(stream)) == all_ids("p0001", "p0005", "p0006", "p0007", "p0010")
    assert stream.faults.total == 4
    assert "pair shards rank 0 worker 0 epoch 0: 7 samples delivered; skipped 4 sample(s)" in caplog.text
    assert set(ids(stream)) == all_ids("p0001", "p0005", "p0006", "p0007", "p0010")
    assert stream.faults.total == 4  # reset per epoch, not accumulated


# --------------------------------------------------------------------------------------------------
# Positions (how a training run resumes a stream) and unpacking (how it gets random access to a split)
# --------------------------------------------------------------------------------------------------


def test_positions_resume_a_worker_without_decoding_what_it_passes_over(shard_dir: Path) -> None:
    FAULTS["corrupt image"][0](shard_dir)  # p0001's lookbook no longer decodes

    def rank_one() -> PairShardStream:
        stream = PairShardStream(shard_dir, shuffle_shards=True, shuffle_buffer=3, seed=4, rank=1, world_size=2)
        stream.set_epoch(2)
        return stream

    def worker(w: int, skip: int = 0) -> tuple[list[tuple[int, str]], dict[str, int]]:
        stream = rank_one()
        got = [(position, sample["record"].pair_id) for position, sample in stream.positioned(w, 2, skip)]
        return got, dict(stream.faults.counts)

    (first, first_faults), (second, _) = worker(0), worker(1)
    assert {i for _, i in first} | {i for _, i in second} == set(ids(rank_one()))
    assert not {i for _, i in first} & {i for _, i in second}
    assert worker(0) == (first, first_faults)  # positions name the same samples every time
    owner, lost = (first, first_faults) if first_faults else (second, worker(1)[1])
    assert lost == {"corrupt image": 1}
    gap = next(p for p in range(len(owner) + 1) if p not in {q for q, _ in owner})  # the corrupt sample's number
    resumed, faults = worker(0 if owner is first else 1, skip=gap + 1)
    assert resumed == [(p, i) for p, i in owner if p > gap]
    assert faults == {}  # passed over without decoding
    with pytest.raises(DataError, match="worker 2 is outside 0..1"):
        next(PairShardStream(shard_dir).positioned(2, 2))


def test_unpack_writes_the_selected_pairs_and_skips_bad_ones(tmp_path: Path, shard_dir: Path,
                                                             pairs: list[PairRecord]) -> None:
    from fashionshoot.data.pairs import read_manifest

    FAULTS["corrupt image"][0](shard_dir)
    stream = PairShardStream(shard_dir, select=PairFilter("medium", split="train"), rank=0, world_size=1)
    manifest = stream.unpack(tmp_path / "test-pairs")
    unpacked = read_manifest(manifest)
    by_id = {r.pair_id: r for r in pairs}
    wanted = {r.pair_id for r in pairs if r.tier != "low" and r.split == "train"} - {"p0001"}
    assert [r.pair_id for r in unpacked] == sorted(wanted)
    assert dict(stream.faults.counts) == {"corrupt image": 1}
    for record in unpacked:
        source = by_id[record.pair_id]
        assert record.garment_image == f"images/{record.pair_id}.garment{Path(source.garment_image).suffix}"
        assert (manifest.parent / record.lookbook_image).read_bytes() == (tmp_path / "images" / source.lookbook_image).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "shards", "test-pairs"]  # no temporary left


# --------------------------------------------------------------------------------------------------
# A real two-process run under accelerate (MULTI_CPU, gloo)
# --------------------------------------------------------------------------------------------------

RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
from accelerate import Accelerator
from fashionshoot.data.shards import PairShardStream

accelerator = Accelerator(cpu=True)
stream = PairShardStream(sys.argv[1], shuffle_shards=True, shuffle_buffer=3)
mine = [s["record"].pair_id for s in stream]
everyone = [None] * accelerator.num_processes
dist.all_gather_object(everyone, mine)
if accelerator.is_main_process:
    print("RESULT", json.dumps({"world": accelerator.num_processes, "rank": stream.rank, "ids": everyone}))
accelerator.end_training()  # tear the process group down before exit (gloo threads otherwise may abort)
"""


@pytest.mark.slow
def test_accelerate_two_processes_see_disjoint_parts(tmp_path: Path, shard_dir: Path) -> None:
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(Path(__file__).parents[1])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    done = subprocess.run(
        [*launch, str(script), str(shard_dir)], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result["world"] == 2 and result["rank"] == 0
    rank0, rank1 = (set(part) for part in result["ids"])
    assert rank0 and rank1 and not rank0 & rank1
    assert rank0 | rank1 == all_ids()
