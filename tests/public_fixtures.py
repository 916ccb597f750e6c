"""Miniature public datasets in their exact on-disk layouts, for reader tests.

Each ``make_*`` writes a handful of tiny images and real-format annotation files under ``tmp`` and
returns the dataset root. The constants below are the ground truth the tests check against.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

#: Dress Code images are 3:4 like the real 768x1024 ones, but tiny.
DC_SIZE = (48, 64)
#: Dress Code keypoints of every person, in the 384x512 frame: [x, y, conf, id]; joint 17 missing.
DC_KEYPOINTS = [[192.0 + 8 * i, 64.0 + 16 * i, 0.9, float(i)] for i in range(17)] + [[0.0, 0.0, 0.0, -1.0]]
DC_PAIRS = {
    "upper_body": {"train": [("000001_0.jpg", "000001_1.jpg"), ("000002_0.jpg", "000002_1.jpg")],
                   "paired": [("000003_0.jpg", "000003_1.jpg")],
                   "unpaired": [("000003_0.jpg", "000001_1.jpg")]},
    "lower_body": {"train": [("000010_0.jpg", "000010_1.jpg")],
                   "paired": [("000011_0.jpg", "000011_1.jpg")],
                   "unpaired": [("000011_0.jpg", "000010_1.jpg")]},
}
DC_CAPTIONS = {"000001": ["white tee", "crew neck", "cotton jersey"], "000010": ["blue jeans", "slim fit", "denim"]}

VH_SIZE = (30, 40)
#: BODY_25 [x, y, c] rows of every VITON-HD person: joint j sits at (j, 2j + 1); joint 8 (mid-hip) missing.
VH_BODY25 = [[float(j), 2.0 * j + 1, 0.0 if j == 8 else 0.8] for j in range(25)]
VH_PAIRS = {"train": [("00001_00.jpg", "00001_00.jpg"), ("00002_00.jpg", "00002_00.jpg")],
            "test": [("00003_00.jpg", "00004_00.jpg"), ("00004_00.jpg", "00003_00.jpg")]}

FS_IDS = ("000000", "000001")


def write_image(path: Path, size: tuple[int, int], color: int = 128, mode: str = "RGB") -> None:
    """A small image with a distinct value per file, so tests can tell files apart."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = (color, 255 - color, color // 2) if mode == "RGB" else color
    Image.new(mode, size, fill).save(path)


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_pairs(path: Path, pairs: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{a} {b}\n" for a, b in pairs))


def make_dresscode(tmp: Path) -> Path:
    root = tmp / "DressCode"
    root.mkdir(parents=True)
    lists = {"train": "train_pairs.txt", "paired": "test_pairs_paired.txt", "unpaired": "test_pairs_unpaired.txt"}
    for cat, by_list in DC_PAIRS.items():
        folder = root / cat
        for key, fname in lists.items():
            _write_pairs(folder / fname, by_list[key])
        for person, cloth in by_list["train"] + by_list["paired"]:
            pid = person.split("_")[0]
            write_image(folder / "images" / person, DC_SIZE, int(pid) * 10)
            write_image(folder / "images" / cloth, DC_SIZE, int(pid) * 10 + 5)
            write_json(folder / "keypoints" / f"{pid}_2.json", {"keypoints": DC_KEYPOINTS})
            label = np.zeros(DC_SIZE[::-1], np.uint8)
            label[20:40, 10:38] = 4 if cat == "upper_body" else 6
            Image.fromarray(label).save(_mkparent(folder / "label_maps" / f"{pid}_4.png"))
            write_image(folder / "skeletons" / f"{pid}_5.jpg", DC_SIZE)
        (folder / "image-densepose").mkdir()  # IDM-VTON style extra folder: must be tolerated
    for key, fname in lists.items():  # the all-category lists at the root
        _write_pairs(root / fname, [p for by_list in DC_PAIRS.values() for p in by_list[key]])
    write_json(root / "fine_captions.json", DC_CAPTIONS)
    write_json(root / "coarse_captions.json", {k: v[:1] for k, v in DC_CAPTIONS.items()})
    return root


def openpose_json(body25: list[list[float]]) -> dict:
    """An OpenPose 1.3 result with one person (face/hand arrays present but zero, as in VITON-HD)."""
    return {"version": 1.3, "people": [{
        "person_id": [-1],
        "pose_keypoints_2d": [v for row in body25 for v in row],
        "face_keypoints_2d": [0.0] * 210,
        "hand_left_keypoints_2d": [0.0] * 63,
        "hand_right_keypoints_2d": [0.0] * 63,
    }]}


def make_vitonhd(tmp: Path) -> Path:
    root = tmp / "VITON-HD"
    for split, pairs in VH_PAIRS.items():
        _write_pairs(root / f"{split}_pairs.txt", pairs)
        folder = root / split
        for person, _ in pairs:
            stem = person[:-4]
            write_image(folder / "image" / person, VH_SIZE, int(stem[:5]) * 20)
            write_image(folder / "cloth" / person, VH_SIZE, int(stem[:5]) * 20 + 7)
            write_image(folder / "cloth-mask" / person, VH_SIZE, 255, mode="L")
            write_image(folder / "image-parse-v3" / f"{stem}.png", VH_SIZE, 5, mode="L")
            write_image(folder / "openpose_img" / f"{stem}_rendered.png", VH_SIZE)
            write_json(folder / "openpose_json" / f"{stem}_keypoints.json", openpose_json(VH_BODY25))
        (folder / "agnostic-v3.2").mkdir()
    write_json(root / "captions.json", {"00001": ["red top", "v neck", "silk"], "00004": ["black tank"]})
    return root


def df2_item(category_id: int, style: int, box: list[float], n_landmarks: int = 4) -> dict:
    landmarks = []
    for k in range(n_landmarks):
        landmarks += [box[0] + 2 * k + 1, box[1] + 3 * k + 1, 2 if k else 0]
    return {"category_name": f"cat{category_id}", "category_id": category_id, "style": style,
            "bounding_box": box, "landmarks": landmarks, "segmentation": [[box[0], box[1], box[2], box[1], box[2], box[3]]],
            "scale": 2, "occlusion": 1, "zoom_in": 1, "viewpoint": 2}


#: image id -> (source, pair_id, items). Positives: 000001:item1-000002:item1 (style 1),
#: 000004:item1-000002:item2 (style 2). 000001:item2 and 000002:item3 share pair_id and style, but
#: style 0 means "cannot pair"; 000003 is another pair_id.
DF2_IMAGES = {
    "000001": ("user", 1, [df2_item(1, 1, [2, 3, 20, 30]), df2_item(8, 0, [5, 30, 25, 39])]),
    "000002": ("shop", 1, [df2_item(1, 1, [0, 0, 30, 30]), df2_item(8, 2, [1, 2, 11, 12]),
                           df2_item(8, 0, [3, 3, 9, 9])]),
    "000003": ("shop", 2, [df2_item(1, 1, [0, 0, 30, 30])]),
    "000004": ("user", 1, [df2_item(8, 2, [4, 4, 24, 36])]),
}


def make_deepfashion2(tmp: Path) -> Path:
    root = tmp / "DeepFashion2"
    for split in ("train", "validation"):
        for iid, (source, pair_id, items) in DF2_IMAGES.items():
            write_image(root / split / "image" / f"{iid}.jpg", (32, 40), int(iid) * 40)
            anno = {"source": source, "pair_id": pair_id}
            anno.update({f"item{k + 1}": it for k, it in enumerate(items)})
            write_json(root / split / "annos" / f"{iid}.json", anno)
    return root


def make_synfashion(tmp: Path) -> tuple[Path, Path]:
    """Returns (rendered root, real root)."""
    rendered, real = tmp / "synfashion_release", tmp / "real_photos"
    write_image(rendered / "T-shirt" / "a.png", (12, 16))
    write_image(rendered / "T-shirt" / "b.jpg", (12, 16))
    write_image(rendered / "coat" / "c.png", (12, 16))
    (rendered / "README.txt").write_text("not an image")
    (rendered / "coat" / "notes.txt").write_text("not an image")
    write_image(real / "coat" / "r.jpg", (12, 16))
    return rendered, real


def face_landmarks(sid: str) -> np.ndarray:
    k = int(sid)
    return np.stack([np.arange(70) * 0.5 + k, np.arange(70) * 0.25 + 2 * k], axis=1).astype(np.float32)


def make_facesynthetics(tmp: Path) -> Path:
    root = tmp / "dataset_100"
    for sid in FS_IDS:
        write_image(root / f"{sid}.png", (16, 16))
        seg = np.full((16, 16), 1, np.uint8)
        seg[0, 0] = 255
        Image.fromarray(seg).save(root / f"{sid}_seg.png")
        rows = "\n".join(f"{x:.3f} {y:.3f}" for x, y in face_landmarks(sid))
        (root / f"{sid}_ldmks.txt").write_text(rows + "\n")
    return root
