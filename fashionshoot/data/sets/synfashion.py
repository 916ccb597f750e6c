"""SynFashion (FashionR2R) reader: rendered garment images in a ``<category>/<image>`` tree.

Layout (768x1024 renders, 20 categories; files directly under the root are ignored)::

    synfashion_release/
      T-shirt/xxx.png  coat/yyy.jpg  ...

Rendered-to-real translation also needs real photos; pass them as ``real_root`` in the same
``<category>/<image>`` layout and every sample says which domain it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fashionshoot.data.images import IMAGE_SUFFIXES, load_image
from fashionshoot.data.sets._common import PublicDataset, SampleTransform
from fashionshoot.errors import DataError


@dataclass(frozen=True)
class TreeImage:
    path: Path
    category: str
    domain: Literal["rendered", "real"]


def _scan_tree(root: Path, domain: Literal["rendered", "real"]) -> list[TreeImage]:
    """Images one level below ``root`` (category folders), sorted for a stable index."""
    if not root.is_dir():
        raise DataError(f"{root}: {domain} image root folder does not exist")
    found = [
        TreeImage(p, cat.name, domain)
        for cat in sorted(d for d in root.iterdir() if d.is_dir())
        for p in sorted(cat.iterdir())
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not found:
        raise DataError(f"{root}: no images found in <category>/<image> folders")
    return found


class SynFashion(PublicDataset):
    """Map-style reader: rendered images first, then (if ``real_root`` is given) real ones.

    Sample keys: ``id`` (``<category>/<file stem>``), ``category``, ``domain`` (``rendered``|``real``),
    ``path`` and ``image`` (PIL RGB).
    """

    name = "synfashion"

    def __init__(
        self,
        root: str | Path,
        real_root: str | Path | None = None,
        transform: SampleTransform | None = None,
    ) -> None:
        super().__init__(root, transform)
        self._index: list[TreeImage] = _scan_tree(self.root, "rendered")
        if real_root is not None:
            self._index += _scan_tree(Path(real_root), "real")

    @property
    def categories(self) -> list[str]:
        return sorted({t.category for t in self._index})

    def _load(self, t: TreeImage) -> dict[str, Any]:
        return {
            "id": f"{t.category}/{t.path.stem}",
            "category": t.category,
            "domain": t.domain,
            "path": str(t.path),
            "image": load_image(t.path),
        }
