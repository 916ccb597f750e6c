"""The procedural garment/lookbook set: determinism, splits, geometry, metadata, and hardness."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionshoot.data.records import PairRecord
from fashionshoot.data.synthetic import (
    CATEGORIES,
    STYLE_DIRS,
    SyntheticConfig,
    SyntheticFashion,
    load_synthetic_config,
    write_synthetic_set,
)
from fashionshoot.data.synthetic.figures import FOREARM, UPPER_ARM
from fashionshoot.errors import ConfigError


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small() -> SyntheticFashion:
    return SyntheticFashion(SyntheticConfig(seed=3, num_garments=12, lookbooks_per_garment=2))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SyntheticConfig]:
    config = SyntheticConfig(seed=5, num_garments=16, lookbooks_per_garment=2, test_fraction=0.25)
    return write_synthetic_set(tmp_path_factory.mktemp("synthetic"), config), config


@pytest.fixture(scope="module")
def retrieval_set() -> tuple[SyntheticFashion, list[Image.Image], list]:
    data = SyntheticFashion(SyntheticConfig(seed=11, num_garments=60, lookbooks_per_garment=2))
    garments = [data.render_garment(i) for i in range(60)]
    lookbooks = [data.lookbook(i, j) for i in range(60) for j in range(2)]
    return data, garments, lookbooks


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- determinism -----------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_in_any_order(small: SyntheticFashion) -> None:
    again = SyntheticFashion(small.config)
    again.lookbook(7, 1)  # generate something else first: items must not depend on order
    assert png_bytes(again.render_garment(4)) == png_bytes(small.render_garment(4))
    a, b = small.lookbook(4, 1), again.lookbook(4, 1)
    for style in ("real", "rendered"):
        assert png_bytes(a.images[style]) == png_bytes(b.images[style])
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert a.crop_box == b.crop_box and a.info == b.info
    assert small.garment(4) == again.garment(4)


def test_different_seed_gives_different_set(small: SyntheticFashion) -> None:
    other = SyntheticFashion(SyntheticConfig(seed=4, num_garments=12, lookbooks_per_garment=2))
    assert [other.garment(i) for i in range(12)] != [small.garment(i) for i in range(12)]
    assert png_bytes(other.lookbook(0, 0).images["real"]) != png_bytes(small.lookbook(0, 0).images["real"])


def test_index_out_of_range_is_an_error(small: SyntheticFashion) -> None:
    with pytest.raises(IndexError):
        small.garment(12)
    with pytest.raises(IndexError):
        small.lookbook(0, 2)


# --- garments and metadata -------------------------------------------------------------------------


def test_identity_is_a_combination_of_shared_attributes() -> None:
    data = SyntheticFashion(SyntheticConfig(num_garments=100))
    specs = [data.garment(i) for i in range(100)]
    slots = {(s.category, s.colour, s.pattern) for s in specs}
    assert len(slots) == 100, "the first num_identities garments have unique (category, colour, pattern)"
    assert len({s.caption for s in specs}) == 100 and len({s.title for s in specs}) > 90
    # No single attribute identifies a garment: colours, patterns and categories are shared.
    for attribute in ("colour", "pattern", "category"):
        assert max(Counter(getattr(s, attribute) for s in specs).values()) >= 4
    assert {s.category for s in specs} == set(CATEGORIES)


def test_product_shot_is_garment_on_near_white(small: SyntheticFashion) -> None:
    for i in range(4):
        spec = small.garment(i)
        image = np.asarray(small.render_garment(i)).astype(int)
        assert image.shape == (128, 128, 3)
        corners = image[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert corners.min() >= 225, "backdrop is near white"
        centre = image[48:80, 48:80].reshape(-1, 3)
        colours = [spec.rgb] + ([spec.accent_rgb] if spec.accent_rgb else [])
        dist = np.min([np.abs(centre - np.array(c)).max(axis=1) for c in colours], axis=0)
        assert np.mean(dist <= 60) > 0.5, f"{spec.title}: garment colours fill the centre"


def test_written_set_round_trips_and_metadata_is_complete(written: tuple[Path, SyntheticConfig]) -> None:
    root, config = written
    rows = read_jsonl(root / "pairs.jsonl")
    assert len(rows) == config.num_garments * config.lookbooks_per_garment
    catalogue = {row["garment_id"]: row for row in read_jsonl(root / "garments.jsonl")}
    assert len(catalogue) == config.num_garments
    for n, row in enumerate(rows):
        record = PairRecord.from_dict(row, where=f"pairs.jsonl:{n + 1}")
        assert record.to_dict() == row
        assert record.tier == "high" and record.confidence == 1.0
        assert record.category in CATEGORIES and record.split in ("train", "test")
        meta = record.metadata
        for key in ("brand", "title", "caption", "attributes"):
            assert meta[key], key
        assert meta["brand"] in meta["title"] and meta["attributes"]["colour"] in meta["title"]
        assert meta["attributes"]["colour"] in meta["caption"]
        assert catalogue[record.garment_id]["caption"] == meta["caption"]
        assert catalogue[record.garment_id]["split"] == record.split
        assert len(record.keypoints) == 18 and all(len(k) == 3 for k in record.keypoints)
        with Image.open(root / record.garment_image) as g, Image.open(root / record.lookbook_image) as lb:
            assert g.size == config.garment_size[::-1] and lb.size == config.lookbook_size[::-1]
        assert set(meta["style_images"]) == set(config.styles)
        for style, path in meta["style_images"].items():
            assert path.startswith(STYLE_DIRS[style] + "/") and (root / path).is_file()
    assert load_synthetic_config(root / "synthetic.json") == config


def test_config_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="num_garments"):
        SyntheticConfig(num_garments=0)
    with pytest.raises(ConfigError, match="styles"):
        SyntheticConfig(styles=("cartoon",))
    with pytest.raises(ConfigError, match="heldout_categories"):
        SyntheticConfig(categories=("top",), heldout_categories=("dress",))
    path = tmp_path / "synthetic.json"
    path.write_text(json.dumps({"seed": 1, "num_garmets": 3}))
    with pytest.raises(ConfigError, match="num_garmets"):
        load_synthetic_config(path)


# --- splits ----------------------------------------------------------------------------------------


def test_splits_are_disjoint_by_garment(written: tuple[Path, SyntheticConfig]) -> None:
    rows = read_jsonl(written[0] / "pairs.jsonl")
    train = {r["garment_id"] for r in rows if r["split"] == "train"}
    test = {r["garment_id"] for r in rows if r["split"] == "test"}
    assert train and test and not train & test


def test_heldout_category_goes_entirely_to_test() -> None:
    data = SyntheticFashion(SyntheticConfig(num_garments=40, test_fraction=0.0, heldout_categories=("skirt",)))
    for i in range(40):
        assert data.split(i) == ("test" if data.garment(i).category == "skirt" else "train")


# --- geometry ----------------------------------------------------------------------------------------


def test_keypoints_are_inside_and_consistent_with_the_figure(retrieval_set) -> None:
    _, _, lookbooks = retrieval_set
    h, w = 128, 96
    ratios = []
    for lb in lookbooks:
        kp = lb.keypoints
        assert kp.shape == (18, 3) and set(np.unique(kp[:, 2])) <= {0.0, 0.5, 1.0}
        present = kp[:, 2] > 0
        assert np.all((kp[present, 0] >= 0) & (kp[present, 0] < w) & (kp[present, 1] >= 0) & (kp[present, 1] < h))
        assert np.all(kp[~present, :2] == 0)
        for sh, el, wr in ((2, 3, 4), (5, 6, 7)):
            if present[[sh, el, wr]].all():
                ratios.append(np.linalg.norm(kp[el, :2] - kp[sh, :2]) / np.linalg.norm(kp[wr, :2] - kp[el, :2]))
        if present[[2, 5, 1]].all():  # shoulders symmetric about the neck
            left, right = np.linalg.norm(kp[2, :2] - kp[1, :2]), np.linalg.norm(kp[5, :2] - kp[1, :2])
            assert left == pytest.approx(right, rel=0.02)
        x1, y1, x2, y2 = lb.crop_box
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
    assert len(ratios) > 50
    np.testing.assert_allclose(ratios, UPPER_ARM / FOREARM, rtol=0.02)
    assert any(lb.info["occluded"] for lb in lookbooks) and not all(lb.info["occluded"] for lb in lookbooks)


def test_rendered_and_real_share_geometry_but_differ(small: SyntheticFashion) -> None:
    real, rendered = small.lookbook(2, 0, ("real",)), small.lookbook(2, 0, ("rendered",))
    np.testing.assert_array_equal(real.keypoints, rendered.keypoints)
    assert real.crop_box == rendered.crop_box
    a = np.asarray(real.images["real"]).astype(int)
    b = np.asarray(rendered.images["rendered"]).astype(int)
    assert a.shape == b.shape and np.abs(a - b).mean() > 3
    # Flat CG colours vs a noisy camera: the render uses far fewer distinct colours.
    assert len(np.unique(b.reshape(-1, 3), axis=0)) * 5 < len(np.unique(a.reshape(-1, 3), axis=0))
    image, keypoints, box = small.render_lookbook(2, 0, style="rendered")
    assert png_bytes(image) == png_bytes(rendered.images["rendered"]) and box == rendered.crop_box
    np.testing.assert_array_equal(keypoints, rendered.keypoints)


def test_garment_colour_appears_in_its_crop_box(retrieval_set) -> None:
    data, _, lookbooks = retrieval_set
    for lb in lookbooks:
        spec = data.garment(int(lb.garment_id[1:]))
        x1, y1, x2, y2 = (int(round(v)) for v in lb.crop_box)
        crop = np.asarray(lb.images["rendered"]).astype(int)[y1:y2, x1:x2].reshape(-1, 3)
        colours = [spec.rgb] + ([spec.accent_rgb] if spec.accent_rgb else [])
        matches = np.any([np.all(crop == np.array(c), axis=1) for c in colours], axis=0)
        assert matches.mean() > 0.1, f"{lb.lookbook_id}: {spec.title} barely visible in its crop box"


# --- hardness ----------------------------------------------------------------------------------------


def _r_at_1(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray) -> float:
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return float(np.mean((queries @ gallery.T).argmax(axis=1) == labels))


def _colour_histogram(pixels: np.ndarray) -> np.ndarray:
    bins = pixels.reshape(-1, 3).astype(int) // 64
    return np.bincount(bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2], minlength=64).astype(float)


def test_raw_pixel_retrieval_fails_but_task_is_learnable(retrieval_set) -> None:
    _, garments, lookbooks = retrieval_set
    labels = np.array([int(lb.garment_id[1:]) for lb in lookbooks])

    def raw(image: Image.Image) -> np.ndarray:
        return np.asarray(image.resize((16, 16), Image.BILINEAR), np.float32).ravel()

    gallery = np.stack([raw(g) for g in garments])
    for style in ("real", "rendered"):
        raw_r1 = _r_at_1(np.stack([raw(lb.images[style]) for lb in lookbooks]), gallery, labels)
        assert raw_r1 < 0.15, f"{style}: raw-pixel R@1 {raw_r1:.2f} means the set is too easy"

    # Oracle that knows where the garment is (crop box) and compares colour statistics.
    def garment_hist(image: Image.Image) -> np.ndarray:
        pixels = np.asarray(image).reshape(-1, 3)
        return _colour_histogram(pixels[pixels.astype(int).sum(axis=1) < 3 * 225])

    def crop_hist(lb) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(v)) for v in lb.crop_box)
        return _colour_histogram(np.asarray(lb.images["rendered"])[y1:y2, x1:x2])

    oracle_r1 = _r_at_1(np.stack([crop_hist(lb) for lb in lookbooks]),
                        np.stack([garment_hist(g) for g in garments]), labels)
    assert oracle_r1 > 0.4, f"oracle R@1 {oracle_r1:.2f}: garment evidence should be in the crop box"


def test_knobs_change_what_is_drawn() -> None:
    config = SyntheticConfig(num_garments=4, lookbooks_per_garment=1, categories=("top",), outfit=False,
                             garment_size=(64, 48), lookbook_size=(96, 96), supersample=1, clutter=(0, 0),
                             occlusion_prob=0.0, styles=("rendered",))
    data = SyntheticFashion(config)
    for i in range(4):
        assert data.garment(i).category == "top"
        assert data.render_garment(i).size == (48, 64)
        lb = data.lookbook(i, 0)
        assert set(lb.images) == {"rendered"} and lb.images["rendered"].size == (96, 96)
        assert not lb.info["occluded"] and all(o["colour"] == "neutral" for o in lb.info["outfit"])
