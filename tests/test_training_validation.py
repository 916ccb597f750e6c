"""The validation metrics can tell right from wrong: ground truth beats chance, wrong poses lose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fashionshoot.training import PhotoshootTrainConfig
from fashionshoot.training.data import load_records, select
from fashionshoot.training.validation import ValidationSettings, pose_scores, select_pairs, validate

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, Path]:
    config = PhotoshootTrainConfig().data
    records, root = load_records(config, tmp_path_factory.mktemp("validation"))
    return select(records, config, "test"), root


def test_round_robin_over_garments() -> None:
    from fashionshoot.data.records import PairRecord

    records = [PairRecord(f"{g}{i}", g, f"l{g}{i}", "g.png", "l.png") for g in "ab" for i in range(2)]
    assert [r.pair_id for r in select_pairs(records)] == ["a0", "b0", "a1", "b1"]
    assert [r.pair_id for r in select_pairs(records, 3)] == ["a0", "b0", "a1"]


def test_validation_is_deterministic_and_ground_truth_beats_chance(test_pairs: tuple[list, Path], tmp_path: Path) -> None:
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

    records, root = test_pairs
    pipe = load_photoshoot_pipeline(save_tiny_photoshoot_pipeline(tmp_path / "p", conditioning="cross_attention"))
    pipe.set_progress_bar_config(disable=True)
    settings = ValidationSettings(num_pairs=8, steps=2)
    first, second = validate(pipe, records, root, settings), validate(pipe, records, root, settings)
    assert first.metrics == second.metrics and len(first.images) == 8
    m = first.metrics
    assert m["num_garments"] == len({r.garment_id for r in records})
    assert m["chance_r@1"] == pytest.approx(1 / m["num_garments"])
    assert m["oracle_r@1"] > 2 * m["chance_r@1"]  # the protocol can recognise a garment in a real lookbook
    # The random tiny VAE cannot show the garment: its round trip falls far below the ground truth.
    assert m["autoencoder_r@1"] < m["oracle_r@1"] / 2
    assert m["pose_pairs"] == sum(len([o for o in records if o.garment_id == r.garment_id]) - 1 for r in first.records)
    assert first.grid(2).size == (3 * 48, 2 * 64)


def test_autoencoded_images_keep_count_and_size(test_pairs: tuple[list, Path], tmp_path: Path) -> None:
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline
    from fashionshoot.training.validation import _lookbook, autoencoded

    records, root = test_pairs
    pipe = load_photoshoot_pipeline(save_tiny_photoshoot_pipeline(tmp_path / "p", conditioning="cross_attention"))
    images = [_lookbook(root, r, (32, 24)) for r in records[:3]]
    out = autoencoded(pipe, images, batch_size=2)
    assert [i.size for i in out] == [(24, 32)] * 3
    assert any(a.tobytes() != b.tobytes() for a, b in zip(images, out, strict=True))


def test_pose_score_tells_the_given_pose_from_the_same_garment_in_other_poses(test_pairs: tuple[list, Path]) -> None:
    """Ground truth scores 1, a blurred ground truth (a soft but pose-true generation) nearly as well, the
    garment in the wrong pose 0, and a pose-blind image (the mean over the garment's poses) exactly chance."""
    from PIL import ImageFilter

    from fashionshoot.training.validation import _lookbook

    records, root = test_pairs
    size = (64, 48)
    others = {r.pair_id: [o for o in records if o.garment_id == r.garment_id and o.pair_id != r.pair_id] for r in records}
    records = [r for r in records if len(others[r.pair_id]) == 1]  # two poses per garment: "wrong" is defined
    assert len(records) >= 10
    truths = [_lookbook(root, r, size) for r in records]
    wrong = [_lookbook(root, others[r.pair_id][0], size) for r in records]
    garments = [Image.open(root / r.garment_image).convert("RGB") for r in records]
    other_poses = [[w] for w in wrong]

    def accuracy(images: list) -> float:
        return pose_scores(images, truths, other_poses, garments)["pose_accuracy"]

    assert accuracy(truths) == 1.0 and accuracy(wrong) == 0.0
    assert accuracy([t.filter(ImageFilter.GaussianBlur(2)) for t in truths]) > 0.9
    blind = [Image.blend(t, w, 0.5) for t, w in zip(truths, wrong, strict=True)]
    scores = pose_scores(blind, truths, other_poses, garments)
    assert abs(scores["pose_contrast"]) < 0.05 and 0.3 < scores["pose_accuracy"] < 0.7
    no_other = pose_scores(truths[:2], truths[:2], [[], []], garments[:2])
    assert no_other["pose_pairs"] == 0 and np.isnan(no_other["pose_accuracy"])
