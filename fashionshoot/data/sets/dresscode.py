"""Dress Code (aimagelab, ECCV 2022) reader, with the MGD multimodal captions.

Layout (extra folders such as ``dense/``, ``masks/``, ``im_sketch/`` or IDM-VTON's ``image-densepose/``
are ignored)::

    DressCode/
      fine_captions.json  coarse_captions.json           # optional (Dress Code Multimodal)
      <category>/                                         # dresses | upper_body | lower_body
        train_pairs.txt  test_pairs_paired.txt  test_pairs_unpaired.txt
        images/013563_0.jpg (person)  013563_1.jpg (garment)
        keypoints/013563_2.json       {"keypoints": [[x, y, conf, id] x 18]}, 384x512 frame
        label_maps/013563_4.png       18 ATR/SCHP classes (see masks.DRESSCODE_LABELS)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from fashionshoot.data.masks import CATEGORIES, dresscode_inpaint_mask
from fashionshoot.data.pose import as_keypoints, rescale_keypoints
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

#: The (width, height) frame Dress Code keypoints are stored in, whatever the image size.
KEYPOINT_FRAME: tuple[int, int] = (384, 512)


def _side_file(person_name: str, suffix: str) -> str:
    """``013563_0.jpg`` -> ``013563_<suffix>`` (keypoints ``_2.json``, label map ``_4.png``)."""
    return person_name.rsplit("_", 1)[0] + "_" + suffix


def read_dresscode_keypoints(path: Path, image_size: tuple[int, int]) -> np.ndarray:
    """COCO-18 ``(18, 3)`` keypoints from a Dress Code JSON, scaled from 384x512 to ``image_size``.

    A joint is missing when its stored x or y is <= 1 (the test the official loaders use); present joints
    with a non-positive stored score get confidence 1, since the loaders draw them regardless.
    """
    data = read_json(path)
    if not isinstance(data, dict) or "keypoints" not in data:
        raise DataError(f"{path}: expected an object with a 'keypoints' list")
    raw = as_keypoints(data["keypoints"], "coco18", where=str(path))
    present = (raw[:, 0] > 1) & (raw[:, 1] > 1)
    raw[:, 2] = np.where(present, np.where(raw[:, 2] > 0, raw[:, 2], 1.0), 0.0)
    return rescale_keypoints(raw, KEYPOINT_FRAME, image_size)


class DressCode(TryOnPairs):
    """Map-style Dress Code reader: one sample per line of the chosen pairs file(s).

    ``categories`` picks one or several category folders; by default every one present under the root
    (so a partial download works), each read through its own pairs file.

    Sample keys: ``im_name``, ``c_name``, ``id``, ``garment_id``, ``category``, ``image`` and ``cloth``
    (PIL RGB), ``keypoints`` (float32 ``(18, 3)`` COCO-18 in ``image`` pixels, confidence 0 = missing),
    ``label_map`` (PIL, class ids), and with ``captions`` set ``caption_chunks`` / ``caption``; with
    ``inpaint_mask`` set, ``inpaint_mask`` (bool ``(H, W)`` at label-map size, see
    :func:`fashionshoot.data.masks.dresscode_inpaint_mask`).
    """

    name = "dresscode"

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "test"] = "train",
        pairing: Literal["paired", "unpaired"] = "paired",
        categories: str | tuple[str, ...] | None = None,
        captions: Literal["fine", "coarse"] | None = None,
        inpaint_mask: Literal["mask", "bounding_box"] | None = None,
        transform: SampleTransform | None = None,
    ) -> None:
        super().__init__(root, transform)
        if split not in ("train", "test"):
            raise ConfigError(f"Dress Code split {split!r}: expected 'train' or 'test'")
        if pairing not in ("paired", "unpaired") or (split == "train" and pairing == "unpaired"):
            raise ConfigError(f"Dress Code has no {split}/{pairing} pairs list")
        if categories is None:
            categories = tuple(c for c in CATEGORIES if (self.root / c).is_dir())
            if not categories:
                raise DataError(f"{self.root}: no category folder found; expected some of {CATEGORIES}")
        categories = (categories,) if isinstance(categories, str) else tuple(categories)
        unknown = set(categories) - set(CATEGORIES)
        if unknown or not categories:
            raise ConfigError(f"Dress Code categories {sorted(unknown) or '()'}: expected some of {CATEGORIES}")
        self.categories = categories
        if captions not in (None, "fine", "coarse"):
            raise ConfigError(f"Dress Code captions {captions!r}: expected 'fine', 'coarse' or None")
        self.split, self.pairing, self.inpaint_mask = split, pairing, inpaint_mask
        if captions is not None:
            self._captions = load_captions(require_file(self.root, f"{captions}_captions.json"))
        pairs_name = "train_pairs.txt" if split == "train" else f"test_pairs_{pairing}.txt"
        for cat in categories:
            self._index.extend(self._index_category(cat, pairs_name))

    def _index_category(self, cat: str, pairs_name: str) -> list[TryOnEntry]:
        folder = require_dir(self.root, cat)
        images, keypoints, labels = (require_dir(folder, d) for d in ("images", "keypoints", "label_maps"))
        pairs = read_pairs(require_file(self.root, cat, pairs_name))
        check_listed(self.root, images, (n for p in pairs for n in p), list_names(images))
        check_listed(self.root, keypoints, (_side_file(p, "2.json") for p, _ in pairs), list_names(keypoints))
        check_listed(self.root, labels, (_side_file(p, "4.png") for p, _ in pairs), list_names(labels))
        return [TryOnEntry(images / p, images / c, folder, cat, self.split) for p, c in pairs]

    def _load(self, e: TryOnEntry) -> dict[str, Any]:
        sample = self._pair_sample(e)
        sample["keypoints"] = read_dresscode_keypoints(
            e.folder / "keypoints" / _side_file(e.person.name, "2.json"), sample["image"].size
        )
        label_map = load_label_map(e.folder / "label_maps" / _side_file(e.person.name, "4.png"))
        sample["label_map"] = label_map
        if self.inpaint_mask is not None:
            kp = rescale_keypoints(sample["keypoints"], sample["image"].size, label_map.size)
            sample["inpaint_mask"] = dresscode_inpaint_mask(
                np.asarray(label_map), kp, e.category, self.inpaint_mask
            )
        return sample
