"""``train/metric_heads.py`` under a real two-process ``accelerate launch`` (MULTI_CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fashionshoot.retrieval.heads import MetricHead

REPO = Path(__file__).parents[1]


@pytest.mark.slow
def test_two_processes_train_identical_heads_and_write_once(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    steps = 5
    overrides = [
        f"output_dir={out}", "data.synthetic.num_garments=12", "data.synthetic.lookbooks_per_garment=2",
        "data.synthetic.test_fraction=0.3", "backbone.tiny_patches=16", f"optim.steps={steps}", "optim.log_every=1",
        "optim.classes_per_batch=4", "proxynca.hidden_dim=0", "hyperbolic.embed_dim=8",
    ]
    done = subprocess.run([*launch, str(REPO / "train" / "metric_heads.py"), *overrides], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["processes"] == 2
    # each rank trained on its own batches; DDP kept the replicas bit-identical (gathered across ranks)
    assert results["replica_spread"] == {"proxynca": 0.0, "hyperbolic": 0.0}

    # written by process 0 only: every log entry once, the summary printed once
    entries = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps_logged = [(e["head"], e["step"]) for e in entries if "step" in e]
    assert steps_logged == [(kind, s) for kind in ("proxynca", "hyperbolic") for s in range(1, steps + 1)]
    assert sum("results" in e for e in entries) == 1 and entries[-1]["results"] == results
    assert done.stdout.count('{\n "before": {') == 1  # train/metric_heads.py's indented summary
    for kind in ("proxynca", "hyperbolic"):
        head = MetricHead.from_pretrained(out / "heads" / kind)
        assert head.kind == kind
