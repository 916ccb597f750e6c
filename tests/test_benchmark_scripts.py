"""The training benchmark scripts run end to end at test size on CPU, so they are ready when run by hand.

CI has no GPU, and ``benchmarks/sd15_gpu.py`` is otherwise only run on a lent device machine;
``benchmarks/train_step.py`` checks that its staged copy of the step computes ``training_loss``. This keeps
them from breaking unnoticed between those runs. It checks that a script completes and reports every
row, not its figures (benchmarks are measured side by side, never asserted in unit tests).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sd15_gpu_benchmark_runs_at_test_size() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sd15_gpu.py"), "--tiny", "--batch-sizes", "2", "--repeats", "1",
         "--steps", "2"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.strip().startswith("2 ")]
    assert [row[1] for row in rows] == ["off", "on"]  # batch 2 without and with gradient checkpointing
    assert all(float(row[2]) > 0 and float(row[5]) > 0 for row in rows)  # ms/step, TFLOP/step
    assert "generate: 64x48, 2 DDIM steps" in done.stdout


def test_sd15_cpu_memory_estimate_runs_at_test_size() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sd15_gpu.py"), "--tiny", "--cpu-memory", "--batch-sizes", "2"],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    peak = next(line for line in done.stdout.splitlines() if "forward+backward peak (MemTracker)" in line)
    assert float(peak.split(":")[1].split()[0]) > 0
    assert "+ AdamW state" in done.stdout


def test_cpu_train_step_benchmark_runs_and_its_staged_step_is_the_real_one() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--repeats", "2", "--warmup", "0",
         "--batch-size", "2", "--threads", "1"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]  # includes the staged-loss == training_loss check
    assert [line.split()[0] for line in done.stdout.splitlines()
            if line.startswith(("train-unet ", "default "))] == ["train-unet", "default"]
    assert "summary (threads=1): train-unet ours/bare = " in done.stdout
    assert "summary: train-unet ours/bare (paired) by threads: 1: " in done.stdout
    assert "garment image encoder" in done.stdout and "+ garment adapter (PhotoshootDenoiser)" in done.stdout
