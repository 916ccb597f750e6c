"""Helpers shared by the public-set readers: layout checks, file reading with named errors, base class.

Every reader indexes its files at construction (so a wrong root fails at once, naming what is
missing) and reads lazily in ``__getitem__`` (so a bad file fails naming that file). Both kinds of
failure are :class:`~fashionshoot.errors.DataError`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from fashionshoot.data.images import load_image
from fashionshoot.data.records import KEY_CHARS, PairRecord
from fashionshoot.errors import DataError

SampleTransform = Callable[[dict[str, Any]], dict[str, Any]]


def require_dir(root: Path, *parts: str) -> Path:
    """``root/parts`` must be a folder; otherwise say which dataset root lacks what."""
    path = root.joinpath(*parts)
    if not path.is_dir():
        raise DataError(f"{root}: expected folder {path.relative_to(root)} is missing ({path})")
    return path


def require_file(root: Path, *parts: str) -> Path:
    """``root/parts`` must be a file; otherwise say which dataset root lacks what."""
    path = root.joinpath(*parts)
    if not path.is_file():
        raise DataError(f"{root}: expected file {path.relative_to(root)} is missing ({path})")
    return path


def list_names(folder: Path) -> set[str]:
    """File names in ``folder`` (one directory read, so checking 100k references stays cheap)."""
    with os.scandir(folder) as it:
        return {e.name for e in it if e.is_file()}


def check_listed(root: Path, folder: Path, names: Iterable[str], listing: set[str]) -> None:
    """Every name must be in ``folder``'s listing; the first absent one is reported with its path."""
    for name in names:
        if name not in listing:
            raise DataError(f"{root}: referenced file {folder / name} is missing")


def read_json(path: Path) -> Any:
    """Parse a JSON file; missing or malformed files raise DataError naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from exc


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """Parse a ``<person image> <garment image>`` pairs file (blank lines ignored)."""
    pairs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise DataError(f"{path}:{n}: expected '<image> <cloth>', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def load_label_map(path: Path) -> Image.Image:
    """A class-id map kept in its stored mode (palette PNGs must not be converted to luminance)."""
    img = load_image(path, mode="")
    if img.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"{path}: label map must be single-channel, got mode {img.mode}")
    return img


def load_captions(path: Path) -> dict[str, list[str]]:
    """MGD noun-chunk captions: ``{"<garment id>": ["chunk", ...]}``."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DataError(f"{path}: captions must map garment ids to lists of noun chunks")
    return data


def caption_text(chunks: list[str]) -> str:
    """Chunks sorted and joined with ``", "`` (the MGD / Fashion-RAG convention, order-independent)."""
    return ", ".join(sorted(chunks))


def file_id(name: str) -> str:
    """The id part of a file name, also the caption key: ``048392_1.jpg`` -> ``048392``, ``03195_00.jpg`` -> ``03195``."""
    return name.split("_")[0]


_NOT_KEY = re.compile(rf"[^{KEY_CHARS}]")


def pair_key(*parts: str) -> str:
    """A pair id that is also a shard key: ``parts`` joined by ``-``, any other character made ``_``.

    Shard keys may only use ``A-Z a-z 0-9 _ -`` (docs/pair-format.md), so ids built from paths
    (``upper_body/images/000001_0.jpg``) could not be packed; the readable paths stay in
    ``garment_id`` / ``lookbook_id``. Parts should include the split: public sets reuse file names
    across splits, and a set packed whole must not repeat a key.
    """
    return "-".join(_NOT_KEY.sub("_", part) for part in parts)


def as_float_array(values: Any, width: int, where: str) -> np.ndarray:
    """``values`` as float32 ``(N, width)`` rows, or DataError naming ``where``."""
    try:
        arr = np.asarray(values, dtype=np.float32)
        return arr.reshape(-1, width)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: expected rows of {width} numbers ({exc})") from exc


class PublicDataset(Dataset):
    """Map-style base: subclasses fill ``self._index`` at construction and implement ``_load``.

    ``transform`` receives the whole sample dict, so images, label maps and keypoints can be changed
    together (see :class:`fashionshoot.data.transforms.ResizeSample`).
    """

    #: Name used in pair ids and record metadata.
    name: str = "public"

    def __init__(self, root: str | Path, transform: SampleTransform | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"{self.root}: dataset root folder does not exist")
        self.transform = transform
        self._index: list[Any] = []

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        sample = self._load(self._index[i])
        return self.transform(sample) if self.transform is not None else sample

    def _load(self, entry: Any) -> dict[str, Any]:
        raise NotImplementedError

    def _rel(self, path: Path) -> str:
        """Path relative to the root, as stored in PairRecords (manifests live next to the root)."""
        return path.relative_to(self.root).as_posix()


@dataclass(frozen=True)
class TryOnEntry:
    """One indexed person/garment pair; ``folder`` is where the per-person side files live."""

    person: Path
    cloth: Path
    folder: Path
    category: str
    split: str

    @property
    def person_id(self) -> str:
        return file_id(self.person.name)

    @property
    def garment_id(self) -> str:
        return file_id(self.cloth.name)


class TryOnPairs(PublicDataset):
    """Base for person/garment pair sets (Dress Code, VITON-HD): shared record export."""

    _index: list[TryOnEntry]
    _captions: dict[str, list[str]] | None = None

    def _pair_sample(self, e: TryOnEntry) -> dict[str, Any]:
        """The fields every try-on set shares: ids, category, both photos and (if loaded) the caption."""
        sample: dict[str, Any] = {
            "im_name": e.person.name,
            "c_name": e.cloth.name,
            "id": e.person_id,
            "garment_id": e.garment_id,
            "category": e.category,
            "image": load_image(e.person),
            "cloth": load_image(e.cloth),
        }
        if self._captions is not None:
            chunks = self._captions.get(e.garment_id, [])
            sample["caption_chunks"] = list(chunks)
            sample["caption"] = caption_text(chunks)
        return sample

    def to_pair_records(self) -> list[PairRecord]:
        """Ground-truth pairs as tier-``high`` records; image paths are relative to ``self.root``.

        ``pair_id`` is shard-safe (``dresscode-train-upper_body-000001_0-000001_1``: set, split, category,
        person and garment file stems); ``garment_id`` / ``lookbook_id`` keep the readable
        ``<set>/<path>`` forms.
        """
        out = []
        for e in self._index:
            person, cloth = self._rel(e.person), self._rel(e.cloth)
            out.append(
                PairRecord(
                    pair_id=pair_key(self.name, e.split, e.category, e.person.stem, e.cloth.stem),
                    garment_id=f"{self.name}/{cloth}",
                    lookbook_id=f"{self.name}/{person}",
                    garment_image=cloth,
                    lookbook_image=person,
                    category=e.category,
                    tier="high",
                    confidence=1.0,
                    split=e.split,
                    metadata={"source": self.name},
                )
            )
        return out
