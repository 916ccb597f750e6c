"""Fine-tune a photoshoot pipeline on garment-lookbook pairs; write checkpoints, the pipeline, a sample grid
and a metrics table (printed at the end).

    accelerate launch train/photoshoot.py [--config configs/photoshoot_tiny.yaml] [--resume latest|DIR|""]
                                          [key=value ...]
    python train/photoshoot.py                      # same, one process

``--resume X`` is ``checkpoint.resume=X``: ``latest`` (the default) continues the newest checkpoint in
``output_dir`` on the same loss trajectory, a checkpoint folder continues that one, ``""`` starts fresh.

With no arguments it generates a small synthetic set and a tiny random pipeline into ``output_dir``
and trains for a few minutes on CPU (configs/photoshoot_tiny.yaml). Real runs set ``model.pretrained``
and ``data.manifest`` (or ``data.shards``: WebDataset shards, streamed). The loop lives in
:mod:`fashionshoot.training`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fashionshoot.config import config_from_argv
from fashionshoot.errors import ConfigError, FashionshootError
from fashionshoot.training import PhotoshootTrainConfig, run

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "photoshoot_tiny.yaml"
USAGE = "train/photoshoot.py [--config FILE] [--resume latest|DIR|\"\"] [key=value ...]"


def parse(argv: list[str]) -> PhotoshootTrainConfig:
    """The run's config from the command line; ``--resume X`` (or ``--resume=X``) becomes the override
    ``checkpoint.resume=X``."""
    argv = [f"checkpoint.resume={a.removeprefix('--resume=')}" if a.startswith("--resume=") else a for a in argv]
    if "--resume" in argv:
        i = argv.index("--resume")
        if i + 1 >= len(argv):
            raise ConfigError('--resume needs a value: latest, a checkpoint folder, or "" to start fresh')
        argv[i : i + 2] = [f"checkpoint.resume={argv[i + 1]}"]
    return config_from_argv(PhotoshootTrainConfig, argv, default_path=DEFAULT_CONFIG)


def main(argv: list[str]) -> int:
    try:  # a mistyped command line or a config the run refuses: the message, not a traceback
        results = run(parse(argv))
    except ConfigError as err:
        print(f"train/photoshoot.py: error: {err}\nusage: {USAGE}", file=sys.stderr)
        return 2
    except FashionshootError as err:  # a missing manifest, shard or weight: named in the message
        print(f"train/photoshoot.py: error: {err}", file=sys.stderr)
        return 1
    if results["main_process"]:  # one summary per run, not per process
        bad = f"; {results['skipped_total']} bad training samples skipped" if results["skipped_total"] else ""
        print(f"trained to step {results['step']} ({results['nan_steps']} non-finite steps skipped{bad}); "
              f"pipeline: {results['pipeline']}; "
              f"samples: {results['grid']}; checkpoint: {results['checkpoint']}")
        print(f"validation metrics ({results['metrics']}):\n{results['metrics'].read_text()}", end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
