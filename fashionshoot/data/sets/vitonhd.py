"""VITON-HD (KAIST, CVPR 2021) reader, with the MGD multimodal captions.

Layout (HR-VITON / StableVITON extras such as ``agnostic-v3.2/`` or ``image-densepose/`` are ignored)::

    VITON-HD/
      train_pairs.txt  test_pairs.txt          "<person>.jpg <cloth>.jpg" per line (test: unpaired)
      captions.json                            optional (MGD): {"03195": ["chunk", ...]}
      <split>/image/000006_00.jpg  cloth/000006_00.jpg  cloth-mask/000006_00.jpg
              image-parse-v3/000006_00.png     CIHP/LIP labels
              openpose_json/000006_00_keypoints.json   OpenPose BODY_25
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from fashionshoot.data.images import load_image
from fashionshoot.data.pose import as_keypoints, convert_keypoints, rescale_keypoints
from fashionshoot.data.sets._common import (
    SampleTransform,
    TryOnEntry,
    TryOnPairs,
    check_listed,
    list_names,
    load_captions,
    load_label_map,
    read_json,
    read_pairs,
    require_dir,
    require_file,
)
from fashionshoot.errors import ConfigError, DataError

_FOLDERS = ("image", "cloth", "cloth-mask", "image-parse-v3", "openpose_json")


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def read_openpose_body25(path: Path) -> np.ndarray:
    """BODY_25 ``(25, 3)`` keypoints of the first person in an OpenPose JSON (all missing if nobody)."""
    data = read_json(path)
    people = data.get("people") if isinstance(data, dict) else None
    if not isinstance(people, list):
        raise DataError(f"{path}: expected an OpenPose object with a 'people' list")
    if not people:
        return np.zeros((25, 3), np.float32)
    person = people[0]
    if not isinstance(person, dict) or "pose_keypoints_2d" not in person:
        raise DataError(f"{path}: people[0] has no 'pose_keypoints_2d'")
    return as_keypoints(person["pose_keypoints_2d"], "body25", where=str(path))


class VitonHD(TryOnPairs):
    """Map-style VITON-HD reader (tops only, so ``category`` is always ``upper_body``).

    ``pairing="paired"`` pairs every person with their own garment (the train protocol and the paired
    test); ``"unpaired"`` uses the cloth named in ``test_pairs.txt``. Keypoints are OpenPose BODY_25 in
    image pixels, converted to COCO-18; pass ``keypoint_frame=(768, 1024)`` when the images were
    downsized but the JSONs were not. Sample keys: those of :class:`DressCode` minus ``label_map``, plus
    ``parse`` (PIL, CIHP ids), ``cloth_mask`` (PIL L) and ``keypoints_body25``.
    """

    name = "vitonhd"

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        pairing: Literal["paired", "unpaired"] = "paired",
        captions: bool = False,
        keypoint_frame: tuple[int, int] | None = None,
        transform: SampleTransform | None = None,
    ) -> None:
        super().__init__(root, transform)
        if split not in ("train", "test"):
            raise ConfigError(f"VITON-HD split {split!r}: expected 'train' or 'test'")
        if pairing not in ("paired", "unpaired"):
            raise ConfigError(f"VITON-HD pairing {pairing!r}: expected 'paired' or 'unpaired'")
        self.split, self.pairing, self.keypoint_frame = split, pairing, keypoint_frame
        if captions:
            self._captions = load_captions(require_file(self.root, "captions.json"))
        folder = require_dir(self.root, split)
        dirs = {d: require_dir(folder, d) for d in _FOLDERS}
        pairs = read_pairs(require_file(self.root, f"{split}_pairs.txt"))
        if pairing == "paired":
            pairs = [(p, p) for p, _ in pairs]
        check_listed(self.root, dirs["image"], (p for p, _ in pairs), list_names(dirs["image"]))
        for d in ("cloth", "cloth-mask"):
            check_listed(self.root, dirs[d], (c for _, c in pairs), list_names(dirs[d]))
        side = {"image-parse-v3": ".png", "openpose_json": "_keypoints.json"}
        for d, suffix in side.items():
            check_listed(self.root, dirs[d], (_stem(p) + suffix for p, _ in pairs), list_names(dirs[d]))
        self._index = [
            TryOnEntry(dirs["image"] / p, dirs["cloth"] / c, folder, "upper_body", split) for p, c in pairs
        ]

    def _load(self, e: TryOnEntry) -> dict[str, Any]:
        sample = self._pair_sample(e)
        stem = _stem(e.person.name)
        body25 = read_openpose_body25(e.folder / "openpose_json" / f"{stem}_keypoints.json")
        if self.keypoint_frame is not None:
            body25 = rescale_keypoints(body25, self.keypoint_frame, sample["image"].size)
        sample["keypoints_body25"] = body25
        sample["keypoints"] = convert_keypoints(body25, "body25", "coco18")
        sample["parse"] = load_label_map(e.folder / "image-parse-v3" / f"{stem}.png")
        sample["cloth_mask"] = load_image(e.folder / "cloth-mask" / e.cloth.name, mode="L")
        return sample
