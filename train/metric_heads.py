"""Train ProxyNCA++ and hyperbolic retrieval heads on a frozen backbone; report held-out R@k.

    accelerate launch train/metric_heads.py [--config configs/metric_heads.yaml] [key=value ...]
    python train/metric_heads.py                      # same, one process

With no arguments it generates the synthetic garment-lookbook set and a tiny random SigLIP2 backbone
into ``output_dir`` and runs on CPU in about a minute. Real runs set ``backbone.path`` (e.g. a local
SigLIP2 copy) and ``data.manifest``. The loop lives in :mod:`fashionshoot.retrieval.training`.
"""

from __future__ import annotations

import json
import sys

from fashionshoot.config import config_from_argv
from fashionshoot.errors import script_exit_code
from fashionshoot.retrieval.training import MetricHeadsConfig, run


def main(argv: list[str]) -> int:
    from accelerate import PartialState

    config = config_from_argv(MetricHeadsConfig, argv)
    results = run(config)
    if PartialState().is_main_process:  # every process returns the results; print them once
        print(json.dumps({"before": results["before"], "after": results["after"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_exit_code("train/metric_heads.py", lambda: main(sys.argv[1:])))
