"""Write the synthetic set to disk in the library's pair format.

Layout under ``out_dir``::

    garments/{garment_id}.png          product shots
    lookbooks/{lookbook_id}.png        "real" style lookbooks
    lookbooks_rendered/{lookbook_id}.png  "rendered" style (same scenes)
    pairs.jsonl                        one PairRecord per lookbook (paths relative to out_dir)
    garments.jsonl                     the catalogue: brand, title, category, caption, attributes
    synthetic.json                     the config used (load with load_synthetic_config)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fashionshoot.config import load_config, to_dict
from fashionshoot.data.records import PairRecord
from fashionshoot.data.synthetic.config import SyntheticConfig
from fashionshoot.data.synthetic.dataset import Lookbook, SyntheticFashion
from fashionshoot.data.synthetic.garments import GarmentSpec

#: Folder of each lookbook style under the output directory.
STYLE_DIRS: dict[str, str] = {"real": "lookbooks", "rendered": "lookbooks_rendered"}
CONFIG_NAME = "synthetic.json"


def load_synthetic_config(path: str | Path) -> SyntheticConfig:
    """Read a ``synthetic.json`` back (unknown keys and wrong types are ConfigErrors)."""
    return load_config(SyntheticConfig, path)


def pair_record(spec: GarmentSpec, lookbook: Lookbook, split: str, garment_image: str,
                lookbook_images: dict[str, str]) -> PairRecord:
    """The ground-truth pair of a garment and one of its lookbooks (tier high, confidence 1)."""
    primary = next(iter(lookbook_images))
    metadata: dict[str, Any] = {
        "brand": spec.brand,
        "title": spec.title,
        "caption": spec.caption,
        "attributes": spec.attributes(),
        "style": primary,
        "style_images": lookbook_images,
        "scene": lookbook.info,
    }
    return PairRecord(
        pair_id=lookbook.lookbook_id,
        garment_id=spec.garment_id,
        lookbook_id=lookbook.lookbook_id,
        garment_image=garment_image,
        lookbook_image=lookbook_images[primary],
        category=spec.category,
        tier="high",
        confidence=1.0,
        crop_box=tuple(round(v, 3) for v in lookbook.crop_box),
        keypoints=[[round(float(v), 3) for v in row] for row in lookbook.keypoints],
        split=split,
        metadata=metadata,
    )


def write_synthetic_set(out_dir: str | Path, config: SyntheticConfig | None = None, progress: bool = False) -> Path:
    """Generate the whole set defined by ``config`` into ``out_dir``; returns ``out_dir``.

    ``progress`` shows a bar per garment: the default training run's set takes about half a minute."""
    from tqdm.auto import tqdm

    config = config or SyntheticConfig()
    out = Path(out_dir)
    for folder in ["garments", *(STYLE_DIRS[s] for s in config.styles)]:
        (out / folder).mkdir(parents=True, exist_ok=True)
    data = SyntheticFashion(config)
    catalogue, pairs = [], []
    for i in tqdm(range(config.num_garments), desc="synthetic set", unit="garment", disable=not progress):
        spec = data.garment(i)
        split = data.split(i)
        garment_image = f"garments/{spec.garment_id}.png"
        data.render_garment(spec).save(out / garment_image)
        catalogue.append({**spec.catalogue_entry(), "image": garment_image, "split": split})
        for j in range(config.lookbooks_per_garment):
            lookbook = data.lookbook(i, j)
            paths = {style: f"{STYLE_DIRS[style]}/{lookbook.lookbook_id}.png" for style in lookbook.images}
            for style, image in lookbook.images.items():
                image.save(out / paths[style])
            pairs.append(pair_record(spec, lookbook, split, garment_image, paths).to_dict())
    _write_jsonl(out / "garments.jsonl", catalogue)
    _write_jsonl(out / "pairs.jsonl", pairs)
    (out / CONFIG_NAME).write_text(json.dumps(to_dict(config), indent=2) + "\n")
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
