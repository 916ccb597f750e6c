"""2-process CPU DDP (gloo) trains the same model as 1 process on the same global batch.

Both runs go through the user-facing entry point (``train/photoshoot.py``), the 2-process one under
``accelerate launch``. Equality holds because the data order, the per-sample randomness and the loss
normalisation do not depend on how the global batch is split (see fashionshoot.training.randomness).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fashionshoot.config import config_from_argv
from fashionshoot.pipelines.testing import saved_weights
from fashionshoot.training import PhotoshootTrainConfig
from fashionshoot.training.data import load_records

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train" / "photoshoot.py"
STEPS = 3

pytestmark = pytest.mark.slow


def _train(out: Path, common: list[str], processes: int, batch_size: int) -> dict[str, torch.Tensor]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, str(SCRIPT)]
    if processes > 1:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  str(SCRIPT)]
    done = subprocess.run([*launch, f"output_dir={out}", f"optim.batch_size={batch_size}", *common],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("trained to step") == 1  # one summary, from the main process
    return saved_weights(out / "pipeline")


def test_two_process_ddp_matches_one_process(tmp_path: Path) -> None:
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

    config = config_from_argv(PhotoshootTrainConfig, [], default_path=ROOT / "configs" / "photoshoot_tiny.yaml")
    load_records(config.data, tmp_path)
    base = save_tiny_photoshoot_pipeline(tmp_path / "base", conditioning="cross_attention", randomize_zero_init=False)
    # Dropout probabilities high enough that condition dropout happens within three steps.
    common = [f"data.manifest={tmp_path / 'synthetic' / 'pairs.jsonl'}", f"model.pretrained={base}",
              f"optim.max_steps={STEPS}", "optim.warmup_steps=0", "validation.steps=1", "validation.num_pairs=2", "validation.grid_rows=1",
              "log_with=none", "dropout.garment=0.2", "dropout.text=0.2", "dropout.both=0.1"]
    one = _train(tmp_path / "one", common, processes=1, batch_size=4)
    two = _train(tmp_path / "two", common, processes=2, batch_size=2)
    start = saved_weights(base)

    assert one.keys() == two.keys() == start.keys()
    delta_one = torch.cat([(one[k] - start[k]).flatten() for k in one])
    delta_two = torch.cat([(two[k] - start[k]).flatten() for k in one])
    assert delta_one.norm() > 1e-3  # it trained
    assert (delta_one - delta_two).norm() <= 1e-4 * delta_one.norm()

    # Control: a different split of the data (other seed) moves the weights measurably differently,
    # so the tolerance above is far tighter than what a real difference looks like.
    other = _train(tmp_path / "other", [*common, "seed=1"], processes=1, batch_size=4)
    delta_other = torch.cat([(other[k] - start[k]).flatten() for k in one])
    assert (delta_one - delta_other).norm() > 1e-2 * delta_one.norm()
