"""Shared test set-up: offline by construction, tiny models built once per session."""

from __future__ import annotations

import os

# Set before any Hugging Face import: tests must never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.pop("FASHIONSHOOT_ALLOW_DOWNLOAD", None)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders of tiny random models in their real on-disk formats, written once per test session."""
    from fashionshoot import testing

    root = tmp_path_factory.mktemp("tiny_models")
    return {
        "sd": testing.save_tiny_stable_diffusion(root / "sd"),
        "sd_inpaint": testing.save_tiny_stable_diffusion(root / "sd_inpaint", inpainting=True),
        "clip": testing.save_tiny_clip(root / "clip"),
        "siglip2": testing.save_tiny_siglip2(root / "siglip2"),
        "open_clip": testing.save_tiny_open_clip(root / "open_clip"),
    }


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread; with several, OpenMP spin-waits on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: Pairs in the ``pairs`` fixture, which ``shard_dir`` writes as three shards of four.
SHARD_SET_SIZE = 12


@pytest.fixture
def pairs(tmp_path: Path) -> list:
    """``SHARD_SET_SIZE`` small pairs (tests/test_pairs.py's ``make_pair_set``) under ``tmp_path/images``."""
    from test_pairs import make_pair_set

    return make_pair_set(tmp_path / "images", SHARD_SET_SIZE)


@pytest.fixture
def shard_dir(tmp_path: Path, pairs: list) -> Path:
    """``pairs`` as three shards of four: p0000-p0003, p0004-p0007, p0008-p0011 (the shard tests' layout:
    splits mixed in each shard)."""
    from fashionshoot.data.shards import write_pair_shards

    write_pair_shards(pairs, tmp_path / "images", tmp_path / "shards", samples_per_shard=4, one_split_per_shard=False)
    return tmp_path / "shards"
