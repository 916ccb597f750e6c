"""`import fashionshoot` stays light: no diffusers / transformers / open_clip until a feature needs them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("diffusers", "transformers", "open_clip", "lpips", "wandb", "faiss", "xformers")
LIGHT_MODULES = (
    "fashionshoot",
    "fashionshoot.config",
    "fashionshoot.weights",
    "fashionshoot.testing",
    "fashionshoot.cli",
    "fashionshoot.data.records",
    "fashionshoot.data.pose",
    "fashionshoot.data.pairs",
    "fashionshoot.data.shards",
    "fashionshoot.data.synthetic",
    "fashionshoot.data.sets",
    "fashionshoot.retrieval",
    "fashionshoot.retrieval.encoders",
    "fashionshoot.retrieval.index",
    "fashionshoot.retrieval.fusion",
    "fashionshoot.metrics",
    "fashionshoot.models",
    "fashionshoot.models.outfit",
    "fashionshoot.models.guidance",
    "fashionshoot.pipelines",
    "fashionshoot.pipelines.cli",
)


def _loaded_after(code: str) -> dict:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_top_level_import_pulls_no_torch_or_heavy_dependency():
    loaded = _loaded_after("import fashionshoot")
    assert not loaded & {"torch", *HEAVY}


def test_library_modules_import_without_heavy_dependencies():
    loaded = _loaded_after("\n".join(f"import {m}" for m in LIGHT_MODULES))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
