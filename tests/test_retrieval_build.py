"""The pair builder end to end on a small synthetic set with deterministic encoders and boxes."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image

from fashionshoot.data.pairs import read_manifest, select_pairs
from fashionshoot.data.shards import ShardIndex
from fashionshoot.errors import DataError
from fashionshoot.retrieval.build import (
    DEFAULT_CATEGORIES,
    BuildConfig,
    ConfidenceConfig,
    MatchConfig,
    PairBuilder,
    TierConfig,
    assign_tiers,
    build_pairs,
    calibrate,
)
from fashionshoot.retrieval.categorize import VLMCategorizer, predict
from fashionshoot.retrieval.detect import Detection
from fashionshoot.retrieval.encoders import HistogramEncoder

NUM_GARMENTS = 30


@dataclass
class SerialState:
    """One rank of a world run one after another in this process (barriers are no-ops)."""

    process_index: int = 0
    num_processes: int = 1

    def wait_for_everyone(self) -> None:
        pass


class GroundTruthDetector:
    """A real :class:`Detector` that answers from annotations: the synthetic set's garment boxes,
    found by pixel content (so it works on any copy of the images)."""

    name = "ground-truth"

    def __init__(self, root: Path) -> None:
        self.boxes = {}
        for line in (root / "pairs.jsonl").read_text().splitlines():
            p = json.loads(line)
            with Image.open(root / p["lookbook_image"]) as im:
                self.boxes[_digest(im.convert("RGB"))] = (tuple(p["crop_box"]), p["category"])

    def detect(self, images, queries):
        out = []
        for im in images:
            box, category = self.boxes.get(_digest(im), (None, None))
            out.append([Detection(box, 0.9, q) for q in queries if box and q.endswith(f" {category}")])
        return out


class CountingEncoder(HistogramEncoder):
    """Counts embedded images; raises after ``fail_after`` of them (a simulated crash)."""

    def __init__(self, name: str, bins: int, fail_after: int | None = None) -> None:
        super().__init__(name, bins=bins)
        self.seen, self.fail_after = 0, fail_after

    def embed_images(self, images):
        self.seen += len(images)
        if self.fail_after is not None and self.seen > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        return super().embed_images(images)


def _digest(im: Image.Image) -> str:
    return hashlib.blake2b(im.tobytes(), digest_size=8).hexdigest()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    from fashionshoot.data.synthetic import SyntheticConfig, write_synthetic_set

    root = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_set(root, SyntheticConfig(
        num_garments=NUM_GARMENTS, lookbooks_per_garment=2, styles=("rendered",), outfit=False, clutter=(0, 2),
        occlusion_prob=0.0, figure_scale=(0.9, 1.1)))


def _config(root: Path, out: Path, **overrides) -> BuildConfig:
    base = BuildConfig(garments=str(root / "garments"), lookbooks=str(root / "lookbooks_rendered"),
                       out_dir=str(out), tiers=TierConfig(sizes={"high": 10, "medium": 20, "low": 30}),
                       garment_chunk=8, batch_size=16, progress=False, samples_per_shard=10)
    return replace(base, **overrides)


def _members(fail_after: int | None = None):
    return {"h6": CountingEncoder("h6", 6, fail_after), "h4": CountingEncoder("h4", 4)}


def _build(root, out, members=None, state=None, boxes_from=None, **overrides):
    return build_pairs(_config(root, out, **overrides), members=members or _members(),
                       detector=GroundTruthDetector(boxes_from or root), state=state or SerialState())


def _truth(root: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in (root / "pairs.jsonl").read_text().splitlines():
        p = json.loads(line)
        out.setdefault(p["garment_id"], set()).add(Path(p["lookbook_image"]).stem)
    return out


def test_end_to_end_pairs_are_right_and_mostly_high_tier(synthetic, tmp_path):
    result = _build(synthetic, tmp_path / "out")
    truth = _truth(synthetic)
    records = read_manifest(result.manifest)
    assert len(records) == NUM_GARMENTS and {r.tier for r in records} == {"high", "medium", "low"}
    correct = [r.lookbook_id in truth[r.garment_id] for r in records]
    assert sum(correct) >= 0.85 * NUM_GARMENTS
    high = [c for r, c in zip(records, correct, strict=True) if r.tier == "high"]
    assert len(high) == 10 and sum(high) >= 9, "the most confident pairs must be right"
    # nested sizes are cumulative: 10 high, 20 - 10 medium, 30 - 20 low
    assert result.report["tiers"] == {"high": 10, "medium": 10, "low": 10}
    assert len(select_pairs(records, "medium", nested=True)) == 20
    r = records[0]
    assert set(r.scores) >= {"h6", "h4", "fused"} and 0.0 <= r.confidence <= 1.0 and r.rank == 1
    assert r.metadata["view"] == "crop" and r.crop_box is not None
    assert r.confidence == 1.0 and min(x.confidence for x in records) == 0.0
    assert ShardIndex.load(tmp_path / "out" / "shards").tier_counts() == result.report["tiers"]
    # every lookbook was a candidate for the 4 categories it does not show: full-image fallbacks, counted
    assert result.report["fallbacks"] == {"no detection: full image used": 2 * NUM_GARMENTS * 4}
    assert (tmp_path / "out" / "config.yaml").is_file()


def test_exclusive_tiers_take_the_next_n_and_thresholds_pick_the_best_reached():
    conf = [0.95, 0.2, 0.8, 0.5, 0.99, 0.1]
    exclusive = TierConfig(sizes={"high": 1, "medium": 2, "low": 2}, nested=False)
    assert assign_tiers(conf, exclusive) == ["medium", "low", "medium", "low", "high", None]
    nested = TierConfig(sizes={"high": 1, "medium": 2, "low": 4}, nested=True)
    assert assign_tiers(conf, nested) == ["medium", None, "low", "low", "high", None]
    thresholds = TierConfig(mode="threshold", thresholds={"high": 0.9, "medium": 0.5})
    assert assign_tiers(conf, thresholds) == ["high", None, "medium", "medium", "high", None]
    with pytest.raises(Exception, match="cumulative"):
        assign_tiers(conf, TierConfig(sizes={"high": 5, "medium": 2}))
    assert calibrate([2.0, 4.0, 3.0], ConfidenceConfig()) == [0.0, 1.0, 0.5]
    assert calibrate([0.0], ConfidenceConfig(method="sigmoid")) == [0.5]


def test_sigmoid_confidence_saturates_instead_of_overflowing():
    # a sharp scale and a far-off signal (e.g. a -Poincaré-distance member) used to raise OverflowError
    sharp = ConfidenceConfig(method="sigmoid", center=0.5, scale=0.05)
    low, mid, high = calibrate([-35.0, 0.5, 40.0], sharp)
    assert 0.0 <= low < 1e-300 and mid == 0.5 and high == 1.0


def test_exclusive_build_and_second_run_embeds_nothing(synthetic, tmp_path):
    members = _members()
    first = _build(synthetic, tmp_path / "out", members, tiers=TierConfig(sizes={"high": 5, "medium": 10}, nested=False))
    assert first.report["tiers"] == {"high": 5, "medium": 10, "low": 0}
    again = _members()
    second = _build(synthetic, tmp_path / "out", again, tiers=TierConfig(sizes={"high": 5, "medium": 10}, nested=False))
    assert second.report["embedded"] == {"h6": 0, "h4": 0} and again["h6"].seen == 0
    assert [r.to_dict() for r in second.records] == [r.to_dict() for r in first.records]


def test_resume_after_interruption_gives_identical_output(synthetic, tmp_path):
    reference = _build(synthetic, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):  # dies while embedding the second garment chunk
        _build(synthetic, tmp_path / "out", _members(fail_after=2 * NUM_GARMENTS * 2 + 8 + 4))
    done = list((tmp_path / "out" / "work" / "results").glob("chunk-*.json"))
    assert len(done) == 1
    resumed = _build(synthetic, tmp_path / "out")
    assert resumed.manifest.read_text() == reference.manifest.read_text()
    assert resumed.report["embedded"]["h4"] < reference.report["embedded"]["h4"]


def test_resume_rescores_chunks_whose_garment_image_or_pairing_metadata_changed(synthetic, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(synthetic, root)
    everything = TierConfig(sizes={"high": 100, "medium": 100, "low": 100})

    def pairs(out: Path) -> dict[str, tuple[str, str, float]]:
        result = _build(root, out, tiers=everything, garment_chunk=100)
        return {r.garment_id: (r.lookbook_id, r.category, round(r.scores["fused"], 4)) for r in result.records}

    before = pairs(tmp_path / "out")
    shutil.copy(root / "garments" / "g00005.png", root / "garments" / "g00000.png")  # new image
    rows = [json.loads(line) for line in (root / "garments.jsonl").read_text().splitlines()]
    rows[1]["category"] = next(r["category"] for r in rows if r["category"] != rows[1]["category"])  # new category
    (root / "garments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lookbook_brand = [{"lookbook_id": f"{rows[2]['garment_id']}-l{i:02d}", "brand": "Nowhere Atelier"} for i in range(2)]
    (root / "lookbooks_rendered.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lookbook_brand))
    resumed, fresh = pairs(tmp_path / "out"), pairs(tmp_path / "fresh")
    assert resumed == fresh
    assert resumed["g00000"] != before["g00000"] and resumed["g00001"][1] == rows[1]["category"]
    assert not resumed.get("g00002", ("",))[0].startswith("g00002-")


def test_two_ranks_split_the_work_and_rank_zero_merges(synthetic, tmp_path):
    reference = _build(synthetic, tmp_path / "ref")
    assert _build(synthetic, tmp_path / "out", state=SerialState(1, 2)) is None
    merged = _build(synthetic, tmp_path / "out", state=SerialState(0, 2))
    assert merged.manifest.read_text() == reference.manifest.read_text()
    writers = {p.name.split("-")[1] for p in (tmp_path / "out" / "work" / "embeddings").rglob("chunk-*")}
    assert writers == {"r0", "r1"}


def test_bad_images_and_empty_candidates_are_counted_never_paired(synthetic, tmp_path):
    import shutil

    root = tmp_path / "set"
    shutil.copytree(synthetic, root)
    (root / "lookbooks_rendered" / "g00001-l00.png").write_bytes(b"not a png")
    (root / "garments" / "g00002.png").write_bytes(b"\x89PNG broken")
    rows = [json.loads(line) for line in (root / "garments.jsonl").read_text().splitlines()]
    rows[3]["brand"] = "Nobody Knows This Brand"
    rows[4]["brand"] = rows[4]["brand"].lower().replace("a", "", 1)  # a typo still matches
    (root / "garments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lookbook_meta = []
    catalogue = {r["garment_id"]: r for r in (json.loads(line) for line in (synthetic / "garments.jsonl").read_text().splitlines())}
    for line in (synthetic / "pairs.jsonl").read_text().splitlines():
        p = json.loads(line)
        lookbook_meta.append({"lookbook_id": p["lookbook_id"], "brand": catalogue[p["garment_id"]]["brand"]})
    (root / "lookbooks_rendered.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lookbook_meta))
    result = _build(root, tmp_path / "out", boxes_from=synthetic, match=MatchConfig(fields={"brand": 85.0}))
    counts = result.report["faults"]["counts"]
    assert counts["undecodable lookbook"] == 1 and counts["undecodable garment"] == 1
    assert counts["no candidate lookbooks"] == 1
    paired = {r.garment_id for r in result.records}
    assert "g00002" not in paired and "g00003" not in paired and "g00004" in paired
    assert all(r.lookbook_id != "g00001-l00" for r in result.records)
    brands = {m["lookbook_id"]: m["brand"] for m in lookbook_meta}
    assert all(brands[r.lookbook_id].lower() == catalogue[r.garment_id]["brand"].lower() for r in result.records)


def test_garments_the_categoriser_cannot_place_are_skipped_and_counted(synthetic, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(synthetic, root)
    rows = [json.loads(line) for line in (root / "garments.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("category")
        r["attributes"].pop("category", None)
    (root / "garments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # an answer that names no category gives a uniform row: no winner, so no category and no pair
    vlm = VLMCategorizer(lambda images, prompt: ["I can't tell"] * len(images), DEFAULT_CATEGORIES, "fake-vlm")
    result = build_pairs(_config(root, tmp_path / "out"), members=_members(), detector=GroundTruthDetector(root),
                         categorizer=vlm, state=SerialState())
    assert result.records == []
    assert result.report["faults"]["counts"]["uncategorised"] == NUM_GARMENTS
    assert predict(vlm, [Image.new("RGB", (4, 4))]) == [()]


def test_mismatched_embedding_dims_are_an_error(synthetic, tmp_path):
    class Other(HistogramEncoder):
        def embed_images(self, images):
            out = super().embed_images(images)
            return out[:, :20] if images[0].size == (128, 128) else out  # garments (128x128) get another dim

    with pytest.raises(DataError, match="dim"):
        build_pairs(_config(synthetic, tmp_path / "out"), members={"x": Other("x")}, detector=None,
                    state=SerialState())


def test_builder_needs_inputs():
    with pytest.raises(Exception, match="garments"):
        PairBuilder(BuildConfig(), members={"h": HistogramEncoder()}, state=SerialState())


def test_embedding_cache_is_incremental_and_checks_dims(tmp_path):
    from fashionshoot.data.faults import FaultReport
    from fashionshoot.data.images import load_image
    from fashionshoot.retrieval.cache import CacheItem, EmbeddingCache, file_fingerprint

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(folder / f"{i}.png")
    encoder = HistogramEncoder(bins=4)

    def items():
        return [CacheItem(p.stem, file_fingerprint(p), lambda p=p: load_image(p))
                for p in sorted(folder.glob("*.png"))]

    first = EmbeddingCache(tmp_path / "cache", encoder.name)
    first.fill(items(), encoder.embed_images, FaultReport(), batch_size=4)
    assert first.embedded == 10
    second = EmbeddingCache(tmp_path / "cache", encoder.name)
    second.fill(items(), encoder.embed_images, FaultReport())
    assert second.embedded == 0
    for i in range(10, 13):
        Image.new("RGB", (8, 8), (0, 20 * i, 0)).save(folder / f"{i}.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "0.png")  # changed content: embedded again
    (folder / "bad.png").write_bytes(b"junk")
    faults = FaultReport()
    third = EmbeddingCache(tmp_path / "cache", encoder.name)
    failed = third.fill(items(), encoder.embed_images, faults)
    assert third.embedded == 4 and failed == {"bad"} and faults.counts["undecodable image"] == 1
    keys = [(i.key, i.fingerprint) for i in items() if i.key != "bad"]
    torch_rows = third.get(keys)
    assert torch_rows.shape == (13, 64)
    assert torch_rows[keys.index(("0", file_fingerprint(folder / "0.png")))].argmax() == 3  # bin of pure blue
    with pytest.raises(DataError, match="dim"):
        third.put(["x"], ["fp"], torch_rows[:1, :10])


def test_cli_builds_with_overrides_and_reports_missing_weights(synthetic, tmp_path, capsys):
    from fashionshoot.retrieval.cli import build_pairs_main

    args = [f"garments={synthetic / 'garments'}", f"lookbooks={synthetic / 'lookbooks_rendered'}",
            f"out_dir={tmp_path / 'out'}", "progress=false", "tiers.sizes={high: 5, medium: 10}"]
    assert build_pairs_main([*args, "members=[{name: h, backend: histogram}]"]) == 0
    assert "10 pairs (high 5, medium 5, low 0)" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "out" / "pairs.jsonl")) == 10
    assert build_pairs_main([*args, "members=[{name: s, path: org/not-here}]"]) == 1
    assert "not found locally" in capsys.readouterr().err
