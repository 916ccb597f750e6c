"""Fine-tune a photoshoot pipeline on garment-lookbook pairs; write checkpoints, the pipeline, a sample grid
and a metrics table (printed at the end).

    accelerate launch train/photoshoot.py [--config configs/photoshoot_tiny.yaml] [key=value ...]
    python train/photoshoot.py                      # same, one process

With no arguments it generates a small synthetic set and a tiny random pipeline into ``output_dir``
and trains for a few minutes on CPU (configs/photoshoot_tiny.yaml). Real runs set
``model.pretrained`` and ``data.manifest``. The loop lives in :mod:`fashionshoot.training`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fashionshoot.config import config_from_argv
from fashionshoot.training import PhotoshootTrainConfig, run

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "photoshoot_tiny.yaml"


def main(argv: list[str]) -> int:
    config = config_from_argv(PhotoshootTrainConfig, argv, default_path=DEFAULT_CONFIG)
    results = run(config)
    if results["main_process"]:  # one summary per run, not per process
        print(f"trained to step {results['step']} ({results['nan_steps']} skipped); pipeline: {results['pipeline']}; "
              f"samples: {results['grid']}; checkpoint: {results['checkpoint']}")
        print(f"validation metrics ({results['metrics']}):\n{results['metrics'].read_text()}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
