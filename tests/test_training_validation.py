"""The validation metrics can tell right from wrong: ground truth beats chance, shuffled poses lose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
    assert m["oracle_pose_accuracy"] > 0.6 and m["oracle_pose_contrast"] > 0
    assert first.grid(2).size == (3 * 48, 2 * 64)


def test_pose_score_drops_when_poses_are_swapped(test_pairs: tuple[list, Path]) -> None:
    """Ground truth scored against its own poses beats the same images scored against rolled poses."""
    from fashionshoot.data.pairs import PairManifestDataset
    from fashionshoot.training.data import _keypoints

    records, root = test_pairs
    dataset = PairManifestDataset(records, root)
    samples = [dataset[i] for i in range(len(dataset))]
    size = (64, 48)
    lookbooks = [s["lookbook"].convert("RGB").resize((size[1], size[0])) for s in samples]
    garments = [s["garment"].convert("RGB") for s in samples]
    keypoints = [_keypoints(s["record"], s["lookbook"], size) for s in samples]
    own = pose_scores(lookbooks, lookbooks, garments, keypoints, 40.0)
    rolled = pose_scores(lookbooks, lookbooks, garments, list(np.roll(np.array(keypoints), 3, axis=0)), 40.0)
    assert own["pose_contrast"] > rolled["pose_contrast"] + 0.02
