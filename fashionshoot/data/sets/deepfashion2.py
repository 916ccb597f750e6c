"""DeepFashion2 (CVPR 2019) reader: one sample per annotated clothing item, plus retrieval positives.

Layout::

    DeepFashion2/
      train/image/000001.jpg   train/annos/000001.json
      validation/image/...     validation/annos/...

Each ``annos`` JSON holds ``source`` ('shop' | 'user'), ``pair_id`` and ``item1..itemN`` with
``category_id`` (1-13), ``category_name``, ``style``, ``bounding_box`` [x1, y1, x2, y2], ``landmarks``
[x, y, v, ...] (v: 2 visible, 1 occluded, 0 unlabelled), ``segmentation``, ``scale``, ``occlusion``,
``zoom_in`` and ``viewpoint``. A user item and a shop item are a positive (consumer-to-shop) pair iff
they share ``pair_id`` and the same ``style > 0``.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fashionshoot.data.faults import FaultReport
from fashionshoot.data.images import load_image
from fashionshoot.data.records import PairRecord
from fashionshoot.data.sets._common import (
    PublicDataset,
    SampleTransform,
    as_float_array,
    check_listed,
    list_names,
    pair_key,
    read_json,
    require_dir,
)
from fashionshoot.errors import ConfigError, DataError

CATEGORY_NAMES: dict[int, str] = {
    1: "short sleeve top", 2: "long sleeve top", 3: "short sleeve outwear", 4: "long sleeve outwear",
    5: "vest", 6: "sling", 7: "shorts", 8: "trousers", 9: "skirt", 10: "short sleeve dress",
    11: "long sleeve dress", 12: "vest dress", 13: "sling dress",
}

#: The split each folder's pairs carry in records: pair readers filter on ``val`` (docs/pair-format.md).
RECORD_SPLITS: dict[str, str] = {"train": "train", "validation": "val"}

_ITEM_KEY = re.compile(r"item\d+")


@dataclass(frozen=True)
class DF2Item:
    """One annotated item, parsed at indexing time (annotations are small; images load lazily)."""

    image: Path
    anno: Path
    item: str
    source: str
    pair_id: int
    style: int
    category_id: int
    bbox: tuple[float, float, float, float]
    landmarks: np.ndarray
    extra: dict[str, Any]

    @property
    def image_id(self) -> str:
        return self.image.stem


def parse_annotation(path: Path, image: Path) -> list[DF2Item]:
    """All items of one DeepFashion2 annotation file; malformed content raises DataError naming it."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    items = []
    for key in sorted((k for k in data if _ITEM_KEY.fullmatch(k)), key=lambda k: int(k[4:])):
        it = data[key]
        try:
            bbox = tuple(float(v) for v in it["bounding_box"])
            if len(bbox) != 4:
                raise ValueError(f"bounding_box has {len(bbox)} values")
            items.append(
                DF2Item(
                    image=image,
                    anno=path,
                    item=key,
                    source=str(data["source"]),
                    pair_id=int(data["pair_id"]),
                    style=int(it["style"]),
                    category_id=int(it["category_id"]),
                    bbox=bbox,  # type: ignore[arg-type]
                    landmarks=as_float_array(it.get("landmarks", []), 3, f"{path} {key}.landmarks"),
                    extra={k: it[k] for k in ("scale", "occlusion", "zoom_in", "viewpoint") if k in it},
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: malformed {key} ({exc.__class__.__name__}: {exc})") from exc
    return items


class DeepFashion2(PublicDataset):
    """Map-style DeepFashion2 reader over items (not images), for retrieval and garment crops.

    Sample keys: ``image_id``, ``item``, ``source``, ``pair_id``, ``style``, ``category_id``,
    ``category``, ``bbox`` (float32 ``(4,)``), ``landmarks`` (float32 ``(L, 3)`` ``[x, y, v]``), the
    extra scalar fields, and ``image``: the whole photo, or with ``crop=True`` the item's box (then
    ``bbox`` and ``landmarks`` are in crop pixels). ``faults``, if given, makes indexing skip and count
    unparseable annotation files instead of raising.
    """

    name = "deepfashion2"

    def __init__(
        self,
        root: str | Path,
        split: Literal["train", "validation"] = "train",
        crop: bool = False,
        faults: FaultReport | None = None,
        transform: SampleTransform | None = None,
    ) -> None:
        super().__init__(root, transform)
        if split not in ("train", "validation"):
            raise ConfigError(f"DeepFashion2 split {split!r}: only 'train' and 'validation' have annotations")
        self.split, self.crop = split, crop
        images, annos = require_dir(self.root, split, "image"), require_dir(self.root, split, "annos")
        anno_names = sorted(n for n in list_names(annos) if n.endswith(".json"))
        check_listed(self.root, images, (n[:-5] + ".jpg" for n in anno_names), list_names(images))
        self._index: list[DF2Item] = []
        for n in anno_names:
            try:
                self._index.extend(parse_annotation(annos / n, images / (n[:-5] + ".jpg")))
            except DataError as exc:
                if faults is None:
                    raise
                faults.skip("malformed annotation", str(exc))

    def _load(self, it: DF2Item) -> dict[str, Any]:
        img = load_image(it.image)
        bbox, landmarks = np.array(it.bbox, np.float32), it.landmarks.copy()
        if self.crop:
            x1, y1, x2, y2 = (round(v) for v in it.bbox)
            img = img.crop((x1, y1, x2, y2))
            labelled = landmarks[:, 2] > 0
            landmarks[labelled, :2] -= (x1, y1)
            bbox = np.array([0, 0, x2 - x1, y2 - y1], np.float32)
        return {
            "image_id": it.image_id,
            "item": it.item,
            "source": it.source,
            "pair_id": it.pair_id,
            "style": it.style,
            "category_id": it.category_id,
            "category": CATEGORY_NAMES.get(it.category_id, str(it.category_id)),
            "bbox": bbox,
            "landmarks": landmarks,
            "image": img,
            **it.extra,
        }

    def positive_pairs(self) -> list[tuple[int, int]]:
        """``(user item index, shop item index)`` for every same-``pair_id``, same-``style > 0`` match."""
        shops: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, it in enumerate(self._index):
            if it.source == "shop" and it.style > 0:
                shops[(it.pair_id, it.style)].append(i)
        return [
            (i, j)
            for i, it in enumerate(self._index)
            if it.source == "user" and it.style > 0
            for j in shops.get((it.pair_id, it.style), [])
        ]

    def to_pair_records(self) -> list[PairRecord]:
        """Consumer-to-shop positives as tier-``high`` records: the shop photo is the garment image,
        the user photo the lookbook image with ``crop_box`` on the worn item; the shop item's own box
        is kept in ``metadata['garment_box']``.

        ``pair_id`` is shard-safe (``deepfashion2-val-000002-item1-000001-item1``: split, then shop and
        user image and item; DeepFashion2 numbers images from 1 in each split), ``garment_id`` /
        ``lookbook_id`` keep the readable ``deepfashion2/<image>:<item>`` forms. The ``validation``
        split is recorded as ``val``, the split name every pair reader filters on."""
        split = RECORD_SPLITS[self.split]
        out = []
        for u, s in self.positive_pairs():
            user, shop = self._index[u], self._index[s]
            out.append(
                PairRecord(
                    pair_id=pair_key(self.name, split, shop.image_id, shop.item, user.image_id, user.item),
                    garment_id=f"{self.name}/{shop.image_id}:{shop.item}",
                    lookbook_id=f"{self.name}/{user.image_id}:{user.item}",
                    garment_image=self._rel(shop.image),
                    lookbook_image=self._rel(user.image),
                    category=CATEGORY_NAMES.get(user.category_id, str(user.category_id)),
                    crop_box=user.bbox,
                    split=split,
                    metadata={"source": self.name, "garment_box": list(shop.bbox), "style": user.style},
                )
            )
        return out
