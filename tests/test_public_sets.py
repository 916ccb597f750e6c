from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from public_fixtures import (
    DC_CAPTIONS,
    DC_KEYPOINTS,
    DC_SIZE,
    DF2_IMAGES,
    FS_IDS,
    VH_BODY25,
    VH_SIZE,
    face_landmarks,
    make_deepfashion2,
    make_dresscode,
    make_facesynthetics,
    make_synfashion,
    make_vitonhd,
)

from fashionshoot.data.faults import FaultReport
from fashionshoot.data.records import PairRecord
from fashionshoot.data.sets import DeepFashion2, DressCode, FaceSynthetics, SynFashion, VitonHD
from fashionshoot.data.shards import PairShardStream, write_pair_shards
from fashionshoot.data.transforms import (
    ResizeSample,
    center_crop,
    resize_and_pad,
    resize_keep_aspect,
    to_tensor,
)
from fashionshoot.errors import ConfigError, DataError


@pytest.fixture
def dresscode(tmp_path):
    return make_dresscode(tmp_path)


@pytest.fixture
def vitonhd(tmp_path):
    return make_vitonhd(tmp_path)


@pytest.fixture
def df2(tmp_path):
    return make_deepfashion2(tmp_path)


# ---------------------------------------------------------------- Dress Code


def test_dresscode_indexes_pairs_per_category(dresscode):
    assert len(DressCode(dresscode)) == 3
    assert len(DressCode(dresscode, categories="lower_body")) == 1
    unpaired = DressCode(dresscode, split="test", pairing="unpaired", categories="upper_body")
    s = unpaired[0]
    assert (s["im_name"], s["c_name"], s["id"], s["garment_id"]) == ("000003_0.jpg", "000001_1.jpg", "000003", "000001")
    assert s["category"] == "upper_body"


def test_dresscode_sample_images_and_keypoints_scaled_from_384x512(dresscode):
    s = DressCode(dresscode, categories="upper_body")[0]
    assert s["image"].size == DC_SIZE and abs(s["image"].getpixel((0, 0))[0] - 10) <= 3
    assert abs(s["cloth"].getpixel((0, 0))[0] - 15) <= 3  # the garment file, not the person
    kp = s["keypoints"]
    assert kp.shape == (18, 3) and kp.dtype == np.float32
    raw = np.array(DC_KEYPOINTS)
    np.testing.assert_allclose(kp[:17, 0], raw[:17, 0] * DC_SIZE[0] / 384)
    np.testing.assert_allclose(kp[:17, 1], raw[:17, 1] * DC_SIZE[1] / 512)
    np.testing.assert_allclose(kp[:17, 2], 0.9, rtol=1e-6)
    assert kp[17, 2] == 0  # stored at (0, 0): missing
    lab = np.asarray(s["label_map"])
    assert lab.shape == DC_SIZE[::-1] and lab[30, 20] == 4 and lab[0, 0] == 0


def test_dresscode_captions_fine_and_coarse(dresscode):
    s = DressCode(dresscode, categories="upper_body", captions="fine")[0]
    assert s["caption_chunks"] == DC_CAPTIONS["000001"]
    assert s["caption"] == "cotton jersey, crew neck, white tee"  # sorted, ", "-joined
    assert DressCode(dresscode, categories="upper_body", captions="coarse")[0]["caption"] == "white tee"
    assert DressCode(dresscode, categories="upper_body", captions="fine")[1]["caption"] == ""  # no entry
    assert "caption" not in DressCode(dresscode)[0]


def test_dresscode_inpaint_mask_and_resize_transform(dresscode):
    ds = DressCode(dresscode, categories="lower_body", inpaint_mask="mask",
                   transform=ResizeSample((24, 32)))
    s = ds[0]
    assert s["image"].shape == (3, 32, 24) and -1 <= s["image"].min() and s["image"].max() <= 1
    assert s["label_map"].dtype == torch.int64 and s["label_map"][15, 10] == 6
    np.testing.assert_allclose(s["keypoints"][0, :2], np.array(DC_KEYPOINTS[0][:2]) / 16, rtol=1e-6)
    assert s["inpaint_mask"].shape == (32, 24) and s["inpaint_mask"][15, 10] == 1


def test_dresscode_pair_records(dresscode):
    recs = DressCode(dresscode, split="test", pairing="unpaired").to_pair_records()
    assert all(isinstance(r, PairRecord) and r.tier == "high" and r.confidence == 1.0 for r in recs)
    r = recs[0]
    assert (r.garment_image, r.lookbook_image) == ("upper_body/images/000001_1.jpg", "upper_body/images/000003_0.jpg")
    assert r.category == "upper_body" and r.split == "test" and (dresscode / r.garment_image).is_file()
    assert len({x.pair_id for x in recs}) == len(recs)
    assert r.pair_id == "dresscode-test-upper_body-000003_0-000001_1"
    assert (r.garment_id, r.lookbook_id) == ("dresscode/upper_body/images/000001_1.jpg",
                                             "dresscode/upper_body/images/000003_0.jpg")


def test_dresscode_layout_errors_name_what_is_missing(dresscode):
    (dresscode / "upper_body" / "keypoints" / "000002_2.json").unlink()
    with pytest.raises(DataError, match="000002_2.json") as err:
        DressCode(dresscode)
    assert str(dresscode) in str(err.value)
    with pytest.raises(DataError, match="test_pairs_paired.txt"):
        (dresscode / "lower_body" / "test_pairs_paired.txt").unlink()
        DressCode(dresscode, split="test", categories="lower_body")
    with pytest.raises(DataError, match="fine_captions.json"):
        (dresscode / "fine_captions.json").unlink()
        DressCode(dresscode, categories="lower_body", captions="fine")
    with pytest.raises(DataError, match="dresses"):
        DressCode(dresscode, categories="dresses")
    with pytest.raises(ConfigError):
        DressCode(dresscode, pairing="unpaired")


def test_dresscode_corrupt_files_fail_naming_the_file(dresscode):
    ds = DressCode(dresscode, categories="upper_body")
    kp_file = dresscode / "upper_body" / "keypoints" / "000001_2.json"
    kp_file.write_text('{"keypoints": [[1, 2, 3')
    with pytest.raises(DataError, match="000001_2.json"):
        ds[0]
    kp_file.write_text(json.dumps({"keypoints": DC_KEYPOINTS[:10]}))
    with pytest.raises(DataError, match="000001_2.json"):
        ds[0]
    (dresscode / "upper_body" / "images" / "000002_1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DataError, match="000002_1.jpg"):
        ds[1]


# ---------------------------------------------------------------- VITON-HD


def test_vitonhd_body25_converted_to_coco18(vitonhd):
    s = VitonHD(vitonhd)[0]
    body25 = np.array(VH_BODY25, np.float32)
    np.testing.assert_array_equal(s["keypoints_body25"], body25)
    kp = s["keypoints"]
    assert kp.shape == (18, 3)
    np.testing.assert_array_equal(kp[4], body25[4])  # r_wrist
    np.testing.assert_array_equal(kp[8], body25[9])  # r_hip <- RHip, not the (missing) MidHip
    np.testing.assert_array_equal(kp[17], body25[18])  # l_ear
    assert (kp[:, 2] > 0).all()
    assert s["image"].size == VH_SIZE and s["cloth_mask"].mode == "L"
    assert np.asarray(s["parse"])[0, 0] == 5 and s["category"] == "upper_body"


def test_vitonhd_pairing_and_captions(vitonhd):
    paired = VitonHD(vitonhd, split="test", pairing="paired")
    unpaired = VitonHD(vitonhd, split="test", pairing="unpaired", captions=True)
    assert [paired[i]["c_name"] for i in range(2)] == ["00003_00.jpg", "00004_00.jpg"]
    s = unpaired[0]
    assert (s["im_name"], s["c_name"]) == ("00003_00.jpg", "00004_00.jpg")
    assert abs(s["cloth"].getpixel((0, 0))[0] - 87) <= 3  # 00004's cloth (JPEG: approximately)
    assert s["caption"] == "black tank"
    assert len(VitonHD(vitonhd).to_pair_records()) == 2


def test_vitonhd_keypoint_frame_rescales(vitonhd):
    s = VitonHD(vitonhd, keypoint_frame=(60, 80))[0]
    np.testing.assert_allclose(s["keypoints"][1, :2], [0.5, 1.5])  # neck (1, 3) halved


def test_vitonhd_empty_people_and_bad_json(vitonhd):
    pose = vitonhd / "train" / "openpose_json" / "00001_00_keypoints.json"
    pose.write_text(json.dumps({"version": 1.3, "people": []}))
    ds = VitonHD(vitonhd)
    assert (ds[0]["keypoints"][:, 2] == 0).all()
    pose.write_text(json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 54}]}))  # 18 points, not 25
    with pytest.raises(DataError, match="00001_00_keypoints.json"):
        ds[0]
    shutil.rmtree(vitonhd / "train" / "cloth-mask")
    with pytest.raises(DataError, match="cloth-mask"):
        VitonHD(vitonhd)


# ---------------------------------------------------------------- DeepFashion2


def _key(ds, i):
    s = ds[i]
    return f"{s['image_id']}:{s['item']}"


def test_deepfashion2_items_and_fields(df2):
    ds = DeepFashion2(df2)
    assert len(ds) == sum(len(items) for _, _, items in DF2_IMAGES.values())
    s = ds[0]
    assert (s["image_id"], s["item"], s["source"], s["pair_id"], s["style"]) == ("000001", "item1", "user", 1, 1)
    assert s["category_id"] == 1 and s["category"] == "short sleeve top" and s["viewpoint"] == 2
    np.testing.assert_array_equal(s["bbox"], [2, 3, 20, 30])
    assert s["landmarks"].shape == (4, 3) and s["landmarks"][1].tolist() == [5, 7, 2]
    assert s["image"].size == (32, 40)


def test_deepfashion2_crop_moves_box_and_landmarks(df2):
    s = DeepFashion2(df2, crop=True)[0]
    assert s["image"].size == (18, 27)
    np.testing.assert_array_equal(s["bbox"], [0, 0, 18, 27])
    assert s["landmarks"][1].tolist() == [3, 4, 2]
    assert s["landmarks"][0].tolist() == [3, 4, 0]  # unlabelled landmarks are left alone


def test_deepfashion2_positives_need_same_pair_id_and_style(df2):
    ds = DeepFashion2(df2, split="validation")
    pairs = {(_key(ds, u), _key(ds, s)) for u, s in ds.positive_pairs()}
    assert pairs == {("000001:item1", "000002:item1"), ("000004:item1", "000002:item2")}
    recs = ds.to_pair_records()
    assert len(recs) == 2 and all(r.tier == "high" and r.split == "val" for r in recs)  # the documented name
    r = next(r for r in recs if r.lookbook_image.endswith("000004.jpg"))
    assert r.garment_image == "validation/image/000002.jpg" and r.crop_box == (4.0, 4.0, 24.0, 36.0)
    assert r.metadata["garment_box"] == [1, 2, 11, 12] and r.category == "trousers"
    assert r.pair_id == "deepfashion2-val-000002-item2-000004-item1"
    assert (r.garment_id, r.lookbook_id) == ("deepfashion2/000002:item2", "deepfashion2/000004:item1")


def test_deepfashion2_malformed_annotation_raises_or_is_counted(df2):
    (df2 / "train" / "annos" / "000003.json").write_text('{"source": "shop", "pair_id": 2, "item1": {"style": 1}}')
    with pytest.raises(DataError, match="000003.json"):
        DeepFashion2(df2)
    faults = FaultReport()
    ds = DeepFashion2(df2, faults=faults)
    assert faults.total == 1 and "000003.json" in faults.examples["malformed annotation"][0]
    assert len(ds) == 6
    (df2 / "train" / "image" / "000001.jpg").unlink()
    with pytest.raises(DataError, match="000001.jpg"):
        DeepFashion2(df2)


# ---------------------------------------------------------------- SynFashion / Face Synthetics


def test_synfashion_tree_and_real_domain(tmp_path):
    rendered, real = make_synfashion(tmp_path)
    ds = SynFashion(rendered)
    assert [ds[i]["id"] for i in range(len(ds))] == ["T-shirt/a", "T-shirt/b", "coat/c"]
    assert ds.categories == ["T-shirt", "coat"]
    both = SynFashion(rendered, real_root=real)
    assert len(both) == 4 and both[3]["domain"] == "real" and both[0]["domain"] == "rendered"
    with pytest.raises(DataError, match="no images"):
        SynFashion(tmp_path / "real_photos" / "coat")


def test_facesynthetics_triples(tmp_path):
    root = make_facesynthetics(tmp_path)
    ds = FaceSynthetics(root)
    assert len(ds) == len(FS_IDS)
    s = ds[1]
    assert s["id"] == "000001" and s["image"].size == (16, 16)
    np.testing.assert_allclose(s["landmarks"], face_landmarks("000001"), atol=1e-3)
    seg = np.asarray(s["segmentation"])
    assert seg[0, 0] == 255 and seg[5, 5] == 1
    (root / "000001_ldmks.txt").write_text("1 2\n3 4\n")
    with pytest.raises(DataError, match="000001_ldmks.txt"):
        ds[1]
    (root / "000000_seg.png").unlink()
    with pytest.raises(DataError, match="000000_seg.png"):
        FaceSynthetics(root)


def test_missing_root_is_named(tmp_path):
    for cls in (DressCode, VitonHD, DeepFashion2, FaceSynthetics, SynFashion):
        with pytest.raises(DataError, match="nowhere"):
            cls(tmp_path / "nowhere")


# ---------------------------------------------------------------- records into shards

SETS = {
    "dresscode": (make_dresscode, DressCode, ("train", "test")),
    "vitonhd": (make_vitonhd, VitonHD, ("train", "test")),
    "deepfashion2": (make_deepfashion2, DeepFashion2, ("train", "validation")),
}


@pytest.mark.parametrize("name", sorted(SETS))
def test_public_records_pack_into_shards_and_read_back(tmp_path, name):
    """Ids built from paths (``dresscode/upper_body/images/...|...``) were refused as shard keys for every
    record of every set; both splits go into one shard set, so keys must also differ across splits."""
    make, cls, splits = SETS[name]
    root = make(tmp_path)
    records = [r for split in splits for r in cls(root, split=split).to_pair_records()]
    assert {r.split for r in records} == {"train", "test" if name != "deepfashion2" else "val"}
    index = write_pair_shards(records, root, tmp_path / "shards", samples_per_shard=2)
    assert index.count() == len(records)
    stream = PairShardStream(tmp_path / "shards", rank=0, world_size=1)
    got = {s["record"].pair_id: s for s in stream}
    assert stream.faults.total == 0 and set(got) == {r.pair_id for r in records}
    for r in records:
        back = got[r.pair_id]
        assert (back["record"].garment_id, back["record"].split) == (r.garment_id, r.split)
        assert back["lookbook"].size == Image.open(root / r.lookbook_image).size


# ---------------------------------------------------------------- transforms


def test_resize_and_pad_moves_points_with_the_image():
    img = Image.new("L", (40, 20))
    img.paste(255, (30, 10, 32, 12))  # a 2x2 block survives 2x NEAREST downscaling
    out, aff = resize_and_pad(img, (20, 20), label=True)
    assert out.size == (20, 20) and aff.offset_y == 5 and aff.scale_x == 0.5
    x, y = aff.apply_points(np.array([[30.0, 10.0, 1.0]]))[0, :2]
    assert np.asarray(out)[int(y), int(x)] == 255


def test_resize_sample_moves_boxes_with_the_image(df2):
    """DeepFashion2's ``bbox`` once stayed in the source frame while its landmarks moved."""
    raw = DeepFashion2(df2)[0]  # a 32x40 photo, bbox [2, 3, 20, 30], landmark 1 at (5, 7)
    scaled = DeepFashion2(df2, transform=ResizeSample((64, 80)))[0]
    np.testing.assert_allclose(scaled["bbox"], raw["bbox"] * 2)
    padded = DeepFashion2(df2, transform=ResizeSample((64, 40), pad=True))[0]  # scale 1, 16 px of pad left
    np.testing.assert_allclose(padded["bbox"], [18, 3, 36, 30])
    np.testing.assert_allclose(padded["landmarks"][1], [21, 7, 2])
    _, aff = resize_and_pad(Image.new("L", (40, 20)), (20, 20))
    np.testing.assert_allclose(aff.apply_boxes(np.array([[0, 0, 40, 20], [10, 4, 20, 8]])),
                               [[0, 5, 20, 15], [5, 7, 10, 9]])


def test_label_resize_is_nearest_and_crop_offsets():
    lab = Image.fromarray(np.array([[3, 7], [7, 3]], np.uint8))
    big, _ = resize_keep_aspect(lab, (8, 8), label=True)
    assert set(np.unique(np.asarray(big))) == {3, 7}  # no interpolated class ids
    crop, aff = center_crop(Image.new("RGB", (10, 8)), (4, 4))
    assert crop.size == (4, 4) and (aff.offset_x, aff.offset_y) == (-3, -2)
    t = to_tensor(Image.new("RGB", (2, 2), (0, 255, 0)))
    assert t.shape == (3, 2, 2) and t[0].max() == -1 and t[1].min() == 1
