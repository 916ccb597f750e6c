"""Training batches streamed from pair shards: endless per-worker epochs, exact resume, skipped samples.

The ``pairs`` and ``shard_dir`` fixtures (tests/conftest.py) are the shard tests' three shards of four pairs.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from test_shards import FAULTS

from fashionshoot.data.records import PairRecord
from fashionshoot.data.shards import write_pair_shards
from fashionshoot.errors import ConfigError, DataError
from fashionshoot.training.config import DataConfig
from fashionshoot.training.shard_batches import StreamProgress, shard_batches


def pair_ids(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A collator for the stream's mechanics: only which pairs, in order (module level: workers pickle it)."""
    return {"pair_ids": tuple(s["record"].pair_id for s in samples)}


def draw(config: DataConfig, progress: StreamProgress, n: int, already: int = 0, stage: int = 0,
         tier: str = "low") -> list[tuple[str, ...]]:
    """``n`` batches of 2 (seed 7, one process) of curriculum ``stage`` at ``tier``, ``already`` drawn before."""
    batches = shard_batches(config, stage, tier, pair_ids, 2, 7, 0, 1, progress, already)
    return [batch["pair_ids"] for batch in itertools.islice(batches, n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_draws_what_the_uninterrupted_one_would(shard_dir: Path, pairs: list[PairRecord],
                                                                 workers: int) -> None:
    """2 workers get unequal parts (two shards vs one), so their epochs wrap at different batches; stopping
    after an odd number of batches makes the resumed loader start with the second worker's turn."""
    config = DataConfig(shards=str(shard_dir), tier="low", num_workers=workers, shuffle_buffer=3)
    straight = draw(config, StreamProgress(max(1, workers)), 14)
    train = {r.pair_id for r in pairs if r.split == "train"}
    seen = Counter(i for batch in straight for i in batch)
    assert set(seen) == train and min(seen.values()) >= 2  # 28 samples of 10 pairs: every epoch is whole
    for stop in (5, 9):
        interrupted = StreamProgress(max(1, workers))
        assert draw(config, interrupted, stop) == straight[:stop]
        resumed = StreamProgress(max(1, workers))
        resumed.load_state_dict(interrupted.state_dict())
        assert draw(config, resumed, 14 - stop, already=stop) == straight[stop:]

    with pytest.raises(DataError, match="saved progress has 14 batches in stage 0, the step count says 4"):
        draw(config, resumed, 1, already=4)
    other = StreamProgress(3)
    with pytest.raises(ConfigError, match=r"read by 2 DataLoader worker\(s\).*data.num_workers=2"):
        other.load_state_dict(StreamProgress(2).state_dict())


def test_fewer_shards_than_readers_is_warned_about(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = DataConfig(shards=str(shard_dir), tier="low", num_workers=2)
    shard_batches(config, 0, "low", pair_ids, 2, 7, 0, 1, StreamProgress(2), 0)  # 3 shards, 2 readers
    assert "readers share shards" not in caplog.text
    shard_batches(config, 0, "high", pair_ids, 2, 7, 0, 2, StreamProgress(2), 0)  # rank 0 of 2: 4 readers
    assert "3 shard(s) hold curriculum stage 0's pairs" in caplog.text and "at least 4 shards" in caplog.text


def test_bad_samples_are_skipped_and_counted_over_resumes_and_an_empty_stream_is_named(shard_dir: Path) -> None:
    """A corrupt image is found when decoded (a resumed worker passes over its prefix undecoded), malformed
    JSON when the shuffle buffer reads ahead (the prefix is read again): either way a resumed run's counts
    must be the uninterrupted run's."""
    FAULTS["corrupt image"][0](shard_dir)  # p0001, a training pair
    FAULTS["malformed json"][0](shard_dir)  # p0010, a training pair
    config = DataConfig(shards=str(shard_dir), tier="low", num_workers=2, shuffle_buffer=3)
    progress = StreamProgress(2)
    drawn = [i for batch in draw(config, progress, 14) for i in batch]
    assert not {"p0001", "p0010"} & set(drawn) and len(set(drawn)) == 8
    epochs = {epoch for epoch, _ in progress.positions}
    assert set(progress.skipped()) == {"corrupt image", "malformed json"}
    assert all(2 <= n <= max(epochs) + 1 for n in progress.skipped().values())  # once per epoch passed
    for stop in (3, 5, 9):
        interrupted = StreamProgress(2)
        draw(config, interrupted, stop)
        resumed = StreamProgress(2)
        resumed.load_state_dict(interrupted.state_dict())
        draw(config, resumed, 14 - stop, already=stop)
        assert resumed.skipped() == progress.skipped(), stop

    nothing = DataConfig(shards=str(shard_dir), tier="low", min_confidence=0.99)
    with pytest.raises(DataError, match=r"rank 0 worker 0 found no usable sample in epoch 0"):
        draw(nothing, StreamProgress(1), 1)


def test_a_curriculum_stage_starts_its_own_stream_even_from_a_checkpoint_of_the_previous_stage(
        shard_dir: Path, pairs: list[PairRecord]) -> None:
    FAULTS["corrupt image"][0](shard_dir)  # p0001: a low-tier pair, so only stage 0 meets it
    config = DataConfig(shards=str(shard_dir), tier="low", num_workers=0, shuffle_buffer=3)
    progress = StreamProgress(1)
    draw(config, progress, 5)  # 10 samples: the whole first epoch (9 usable pairs) and one more
    saved = progress.state_dict()  # a checkpoint written at the last step of stage 0
    resumed = StreamProgress(1)
    resumed.load_state_dict(saved)
    high = draw(config, resumed, 3, stage=1, tier="high")
    assert {r.tier for r in pairs if r.pair_id in {i for batch in high for i in batch}} == {"high"}
    assert resumed.stage == 1 and resumed.batches == 3
    assert progress.skipped()["corrupt image"] >= 1
    assert resumed.skipped() == progress.skipped()  # stage 0's count is kept
    again = StreamProgress(1)
    again.load_state_dict(resumed.state_dict())  # and saved in stage 1's checkpoints
    assert again.skipped() == progress.skipped()
    assert draw(config, StreamProgress(1), 3, stage=1, tier="high") == high  # as if entered without a restart


def test_the_test_split_is_unpacked_once_and_again_when_the_shards_change(tmp_path: Path, shard_dir: Path,
                                                                          pairs: list[PairRecord]) -> None:
    from fashionshoot.data.pairs import read_manifest
    from fashionshoot.training.shard_batches import unpack_test_split

    config = DataConfig(shards=str(shard_dir), tier="low", test_split="val")
    manifest = unpack_test_split(config, tmp_path / "test-pairs")
    assert [r.pair_id for r in read_manifest(manifest)] == [r.pair_id for r in pairs if r.split == "val"]
    written = manifest.stat().st_mtime_ns
    assert unpack_test_split(config, tmp_path / "test-pairs").stat().st_mtime_ns == written  # reused
    write_pair_shards(pairs[:9], tmp_path / "images", shard_dir, samples_per_shard=4,
                      one_split_per_shard=False)  # the set changed
    assert [r.pair_id for r in read_manifest(unpack_test_split(config, tmp_path / "test-pairs"))] == ["p0004"]
