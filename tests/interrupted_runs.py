"""Simulating a killed training run without changing its config (a shorter ``max_steps`` would change
a decaying LR schedule, i.e. make it a different run)."""

from __future__ import annotations

import shutil
from pathlib import Path

from fashionshoot.training.checkpoint import CHECKPOINT_DIR


def killed_after(run_dir: Path, step: int, into: Path) -> None:
    """Leave in ``into`` what the run in ``run_dir`` would have left, had it been killed right after
    checkpointing ``step``."""
    name = f"checkpoint-{step:08d}"
    shutil.copytree(run_dir / CHECKPOINT_DIR / name, into / CHECKPOINT_DIR / name)
