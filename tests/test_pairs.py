"""Pair manifests, selection, weighting and the manifest dataset."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionshoot.data.pairs import (
    PairFilter,
    PairManifestDataset,
    SampleSpec,
    collate_pairs,
    confidence_weights,
    read_manifest,
    select_pairs,
    weighted_sampler,
    write_manifest,
)
from fashionshoot.data.records import TIERS, PairRecord
from fashionshoot.errors import DataError


def make_pair_set(root: Path, n: int, size: tuple[int, int] = (24, 16)) -> list[PairRecord]:
    """``n`` pairs with tiny PIL images under ``root``; tiers cycle high/medium/low, confidence rises with i.

    Shared with tests/test_shards.py.
    """
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        ext = "jpg" if i % 2 == 0 else "png"
        Image.new("RGB", size, (i * 7 % 256, 40, 200)).save(root / f"g{i}.{ext}")
        Image.new("RGB", size, (10, i * 5 % 256, 90)).save(root / f"l{i}.{ext}")
        records.append(
            PairRecord(
                pair_id=f"p{i:04d}",
                garment_id=f"g{i}",
                lookbook_id=f"l{i}",
                garment_image=f"g{i}.{ext}",
                lookbook_image=f"l{i}.{ext}",
                category=("top", "dress")[i % 2],
                tier=TIERS[i % 3],
                confidence=round((i + 1) / (n + 1), 4),
                scores={"siglip": 0.5 + i / (4 * n), "hyperbolic": 0.25},
                rank=i % 4,
                crop_box=(1, 2, 20, 14) if i % 2 else None,
                keypoints=[[3.0, 4.0, 1.0]] * 18 if i % 3 == 0 else None,
                split="val" if i % 5 == 4 else "train",
                metadata={"source": "unit", "nested": {"i": i}},
            )
        )
    return records


@pytest.fixture
def pairs(tmp_path: Path) -> list[PairRecord]:
    return make_pair_set(tmp_path, 9)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_manifest_round_trip(tmp_path: Path, pairs: list[PairRecord], suffix: str) -> None:
    path = write_manifest(pairs, tmp_path / f"sub/manifest{suffix}")
    assert read_manifest(path) == pairs
    assert read_manifest(write_manifest([], tmp_path / f"empty{suffix}")) == []


def test_jsonl_errors_name_file_and_line(tmp_path: Path, pairs: list[PairRecord]) -> None:
    path = write_manifest(pairs[:3], tmp_path / "m.jsonl")
    good = path.read_text().splitlines()
    cases = {
        "{not json": "malformed JSON",
        json.dumps({**json.loads(good[0]), "colour": "red"}): "unknown pair-record key",
        json.dumps({**json.loads(good[0]), "tier": "great"}): "tier 'great'",
        json.dumps({**json.loads(good[0]), "keypoints": [[1, 2, 1], [1, "x", 1]]}): "keypoint row 1",
        json.dumps({**json.loads(good[0]), "keypoints": {"nose": [1, 2]}}): "keypoints must be a list",
        "[1, 2]": "expected a JSON object",
    }
    for bad, message in cases.items():
        path.write_text("\n".join([good[0], "", bad, good[1]]) + "\n")
        with pytest.raises(DataError, match=message) as err:
            read_manifest(path)
        assert f"{path}:3" in str(err.value)


BAD_FIELDS = {
    "confidence": ["high", "0.5", True, math.nan, 1.5, None],
    "crop_box": ["abcd", [1, 2, 3, "x"], [1, 2, 3, math.nan], [1, 2, 3], [1, 2, 3, True], 5],
    "tier": [["high"]],
    "scores": ["x", {"siglip": "0.9"}, {"siglip": True}, {"siglip": None}],
    "rank": ["first", 1.5, True],
    "split": [5],
    "pair_id": [7],
    "category": [None],
    "metadata": [[1, 2]],
}  # fmt: skip


@pytest.mark.parametrize(("key", "value"), [(k, v) for k, vs in BAD_FIELDS.items() for v in vs])
def test_wrongly_typed_fields_are_data_errors_naming_line_and_pair(tmp_path: Path, pairs: list[PairRecord],
                                                                    key: str, value: object) -> None:
    """A "0.5" confidence once passed and broke select_pairs later; "high" raised a bare ValueError."""
    row = {**pairs[1].to_dict(), key: value}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(pairs[0].to_dict()) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=f"{key}") as err:
        read_manifest(path)
    assert str(err.value).startswith(f"{path}:2: pair ")
    assert "p0001" in str(err.value) or key == "pair_id"


def test_record_numbers_are_normalised(pairs: list[PairRecord]) -> None:
    record = PairRecord(**{**pairs[0].to_dict(), "confidence": 1, "rank": np.int64(2),
                           "crop_box": np.array([1, 2, 3, 4], np.float32), "scores": {"a": np.float32(0.5)}})
    assert (record.confidence, record.rank, record.crop_box, record.scores) == (1.0, 2, (1.0, 2.0, 3.0, 4.0),
                                                                                 {"a": 0.5})
    assert type(record.confidence) is float and type(record.rank) is int
    assert json.loads(json.dumps(record.to_dict()))["crop_box"] == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_manifest_refuses_records_read_manifest_would_reject(tmp_path: Path, pairs: list[PairRecord],
                                                                    suffix: str) -> None:
    nan_keypoints = PairRecord(**{**pairs[1].to_dict(), "keypoints": [[math.nan, 1.0, 1.0]] + [[1.0, 1.0, 1.0]] * 17})
    ragged = PairRecord(**{**pairs[2].to_dict(), "keypoints": [[1.0, 2.0]]})
    mutated = PairRecord(**pairs[3].to_dict())
    mutated.confidence = "0.5"  # type: ignore[assignment]
    path = tmp_path / f"m{suffix}"
    for bad, message in ((nan_keypoints, "keypoint row 0"), (ragged, "keypoint row 0"), (mutated, "confidence")):
        with pytest.raises(DataError, match=message) as err:
            write_manifest([pairs[0], bad], path)
        assert str(err.value).startswith(f"{path}: pair {bad.pair_id!r}")
        assert not path.exists()


def test_manifest_path_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unsupported manifest type"):
        read_manifest(tmp_path / "m.csv")
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "absent.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet"):
        read_manifest(tmp_path / "bad.parquet")


def test_parquet_without_pyarrow_is_a_clear_error(
    tmp_path: Path, pairs: list[PairRecord], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(DataError, match="pip install 'fashionshoot\\[parquet\\]'"):
        write_manifest(pairs, tmp_path / "m.parquet")


def test_select_pairs_nested_and_exact(pairs: list[PairRecord]) -> None:
    def tiers_of(selected: list[PairRecord]) -> set[str]:
        return {r.tier for r in selected}

    assert tiers_of(select_pairs(pairs, "medium")) == {"high", "medium"}
    assert tiers_of(select_pairs(pairs, "medium", nested=False)) == {"medium"}
    assert tiers_of(select_pairs(pairs, ["high", "low"], nested=False)) == {"high", "low"}
    assert select_pairs(pairs, "low") == pairs
    assert select_pairs(pairs) == pairs
    assert [r.pair_id for r in select_pairs(pairs, min_confidence=0.75)] == ["p0007", "p0008"]
    assert all(r.split == "val" for r in select_pairs(pairs, split="val"))
    assert len(select_pairs(pairs, split="val")) == 1
    assert {r.category for r in select_pairs(pairs, categories=["dress"])} == {"dress"}
    with pytest.raises(DataError, match="tier 'best'"):
        PairFilter(tiers="best")


def test_a_single_category_name_is_not_a_substring_test() -> None:
    """``categories="dress"`` once kept "", "dre" and "s": ``in`` a str is a substring test."""
    records = [PairRecord(f"p{i}", "g", "l", "g.jpg", "l.jpg", category=c)
               for i, c in enumerate(["dress", "", "dre", "s", "dresses", "top"])]
    assert [r.category for r in select_pairs(records, categories="dress")] == ["dress"]
    assert [r.category for r in select_pairs(records, categories=("dress", "top"))] == ["dress", "top"]
    assert PairFilter(categories="top").accepts(records[5]) and not PairFilter(categories="top").accepts(records[1])


def test_confidence_weights_and_sampler(pairs: list[PairRecord]) -> None:
    weights = confidence_weights(pairs, power=2.0)
    assert weights == pytest.approx([r.confidence**2 for r in pairs])
    assert confidence_weights(pairs, power=0.0) == [1.0] * len(pairs)

    zero_some = [
        PairRecord(**{**r.to_dict(), "confidence": 0.0 if i < 5 else 1.0}) for i, r in enumerate(pairs)
    ]
    drawn = list(weighted_sampler(zero_some, num_samples=200, generator=torch.Generator().manual_seed(0)))
    assert set(drawn) == {5, 6, 7, 8}
    with pytest.raises(DataError, match="no record has a positive"):
        weighted_sampler(zero_some[:5])


def test_manifest_dataset_samples_and_collate(tmp_path: Path, pairs: list[PairRecord]) -> None:
    manifest = write_manifest(pairs, tmp_path / "manifest.jsonl")
    to_tensor = SampleSpec(size=(12, 8), transform=lambda im: torch.from_numpy(np.array(im)))
    ds = PairManifestDataset.from_manifest(manifest, PairFilter("high", nested=False), to_tensor)
    assert [s["record"].pair_id for s in ds] == ["p0000", "p0003", "p0006"]
    assert ds[0]["garment"].shape == (8, 12, 3)
    assert ds.weights() == [r.confidence for r in ds.records]

    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_pairs)))
    assert batch["garment"].shape == (3, 8, 12, 3)
    assert batch["weight"].tolist() == pytest.approx(ds.weights())
    assert [r.pair_id for r in batch["record"]] == ["p0000", "p0003", "p0006"]

    pil = PairManifestDataset(pairs, tmp_path)[1]
    assert isinstance(pil["lookbook"], Image.Image) and pil["lookbook"].size == (24, 16)
    assert collate_pairs([pil])["lookbook"] == [pil["lookbook"]]


def test_manifest_dataset_bad_images_name_the_file(tmp_path: Path, pairs: list[PairRecord]) -> None:
    ds = PairManifestDataset(pairs, tmp_path)
    (tmp_path / pairs[0].lookbook_image).unlink()
    with pytest.raises(DataError, match=f"{tmp_path / pairs[0].lookbook_image}: image file not found"):
        ds[0]
    (tmp_path / pairs[1].garment_image).write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=f"{tmp_path / pairs[1].garment_image}: cannot decode image"):
        ds[1]
    assert ds[2]["record"] is pairs[2]
