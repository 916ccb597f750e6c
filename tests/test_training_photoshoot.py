"""train/photoshoot.py: end-to-end default run, exact resume, checkpoint/config checks, NaN stop."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import runpy
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from interrupted_runs import killed_after
from PIL import Image

from fashionshoot.config import config_from_argv
from fashionshoot.data.pairs import read_manifest, write_manifest
from fashionshoot.data.records import PairRecord
from fashionshoot.errors import ConfigError, FashionshootError
from fashionshoot.pipelines.testing import saved_weights
from fashionshoot.training import PhotoshootTrainConfig, TrainingDiverged, run
from fashionshoot.training import loop as loop_module
from fashionshoot.training.checkpoint import STATE_NAME, checkpoints
from fashionshoot.training.data import load_records

ROOT = Path(__file__).resolve().parent.parent
TINY_YAML = ROOT / "configs" / "photoshoot_tiny.yaml"
#: A small synthetic set and a random tiny VAE: these tests check plumbing, not learning
#: (tests/test_training_learning.py trains the default config as shipped).
SMALL = ["data.synthetic.num_garments=40", "data.synthetic.lookbooks_per_garment=2", "model.tiny_vae_steps=0"]
#: Few, small steps on the adapter and pose channels only.
FAST = [*SMALL, "model.train_unet=false", "optim.batch_size=2", "validation.steps=1", "validation.num_pairs=2",
        "validation.grid_rows=1", "log_with=none"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides pointing at one synthetic set and one tiny base pipeline, built once for the module."""
    from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

    folder = tmp_path_factory.mktemp("shared")
    config = config_from_argv(PhotoshootTrainConfig, SMALL, default_path=TINY_YAML)
    load_records(config.data, folder)
    base = save_tiny_photoshoot_pipeline(folder / "base", conditioning="cross_attention", randomize_zero_init=False)
    return [f"data.manifest={folder / 'synthetic' / 'pairs.jsonl'}", f"model.pretrained={base}"]


def _config(out: Path, *overrides: str) -> PhotoshootTrainConfig:
    return config_from_argv(PhotoshootTrainConfig, [f"output_dir={out}", *FAST, *overrides], default_path=TINY_YAML)


def _manifest_like(shared: list[str], folder: Path, change: Callable[[int, PairRecord], PairRecord]) -> Path:
    """A copy of the shared manifest in ``folder`` with ``change(index, record)`` applied, beside links to its images."""
    source = Path(shared[0].split("=", 1)[1])
    manifest = folder / "pairs.jsonl"
    write_manifest([change(i, r) for i, r in enumerate(read_manifest(source))], manifest)
    for image_dir in ("garments", "lookbooks"):
        (folder / image_dir).symlink_to(source.parent / image_dir)
    return manifest


def _scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """Step -> value of scalar ``tag`` in the run's tensorboard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run_dir.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def test_default_config_end_to_end(tmp_path: Path) -> None:
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline

    (tmp_path / ".base-incomplete" / "vae").mkdir(parents=True)  # what a run killed mid-build leaves
    (tmp_path / "base").mkdir()
    (tmp_path / "checkpoints" / ".tmp-checkpoint-00000007").mkdir(parents=True)  # a save killed midway
    results = run(_config(tmp_path, "optim.max_steps=2", "checkpoint.every=1", "checkpoint.keep=1",
                          "validation.every=1"))
    assert (tmp_path / "base" / "model_index.json").is_file() and not (tmp_path / ".base-incomplete").exists()
    assert results["step"] == 2 and results["nan_steps"] == 0 and set(results["losses"]) == {1, 2}
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-00000002"]  # rotated, keep=1
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "synthetic" / "pairs.jsonl").is_file()
    pipe = load_photoshoot_pipeline(results["pipeline"])
    assert pipe.pose_channels == 18
    assert pipe.default_size == (32, 24)  # the trained resolution (the base's UNet says 32x32)
    with Image.open(results["grid"]) as grid:
        assert grid.size == (3 * 24, 32)  # garment | generated | ground truth, one test pair
    assert sorted(p.name for p in (tmp_path / "validation").glob("*.png")) == ["step-00000001.png", "step-00000002.png"]
    table = results["metrics"].read_text().splitlines()
    assert table[0].startswith("| step | garment_r@1") and [row.split("|")[1].strip() for row in table[2:]] == ["1", "2"]
    assert {"garment_r@1", "chance_r@1", "oracle_r@1", "pose_accuracy"} <= set(results["validation"])


def test_resume_matches_uninterrupted_run(tmp_path: Path, shared: list[str]) -> None:
    """Same config, interrupted at step 2 of 4: the cosine schedule, data order and RNG all continue."""
    common = [*shared, "optim.grad_accum=2", "checkpoint.every=2", "checkpoint.keep=2", "optim.warmup_steps=1",
              "optim.max_steps=4", "optim.lr_scheduler=cosine"]
    straight = run(_config(tmp_path / "a", *common))
    killed_after(tmp_path / "a", 2, tmp_path / "b")
    validated = tmp_path / "b" / "validation"  # the killed run validated at step 1, and at 3 after its checkpoint,
    validated.mkdir()  # and was killed while writing a row
    (validated / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "num_pairs": 2, "garment_r@1": 0.5}) + "\n"
                                                     for step in (1, 3)) + '{"step": 4, "num_pa')
    (validated / "step-00000003.png").touch()
    resumed = run(_config(tmp_path / "b", *common, "checkpoint.resume=latest"))
    assert set(resumed["losses"]) == {3, 4}
    assert [row.split("|")[1].strip() for row in resumed["metrics"].read_text().splitlines()[2:]] == ["1", "4"]
    assert sorted(p.name for p in validated.glob("*.png")) == ["step-00000004.png"]
    assert resumed["losses"] == {k: straight["losses"][k] for k in (3, 4)}
    a, b = saved_weights(straight["pipeline"]), saved_weights(resumed["pipeline"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in saved_weights(Path(shared[1].split("=", 1)[1])).items())

    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.002 -> 0\.005"):
        run(_config(tmp_path / "c", *common, "optim.lr=5e-3", f"checkpoint.resume={resumed['checkpoint']}"))


def test_training_from_shards_streams_validates_and_resumes_exactly(tmp_path: Path, shared: list[str]) -> None:
    """Two DataLoader workers, killed after step 3 of 5 (an odd batch count: the resumed loader must start
    with the second worker's turn); the test split is unpacked once for validation."""
    from fashionshoot.data.pairs import read_manifest
    from fashionshoot.data.shards import write_pair_shards

    manifest = Path(shared[0].split("=", 1)[1])
    write_pair_shards(read_manifest(manifest), manifest.parent, tmp_path / "shards", samples_per_shard=16)
    common = [f"data.shards={tmp_path / 'shards'}", shared[1], "data.num_workers=2", "checkpoint.every=3",
              "optim.max_steps=5", "optim.lr_scheduler=cosine", "optim.warmup_steps=1"]
    straight = run(_config(tmp_path / "a", *common))
    killed_after(tmp_path / "a", 3, tmp_path / "b")
    resumed = run(_config(tmp_path / "b", *common))
    assert resumed["losses"] == {k: straight["losses"][k] for k in (4, 5)}
    a, b = saved_weights(straight["pipeline"]), saved_weights(resumed["pipeline"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    tested = read_manifest(tmp_path / "a" / "test-pairs" / "pairs.jsonl")
    assert {r.pair_id for r in tested} == {r.pair_id for r in read_manifest(manifest) if r.split == "test"}
    assert straight["validation"]["num_pairs"] == 2 and straight["skipped"] == {}

    with pytest.raises(ConfigError, match=r"data.num_workers=2"):
        run(_config(tmp_path / "b", *common, "data.num_workers=0", "optim.max_steps=6"))
    with pytest.raises(ConfigError, match="data.manifest and data.shards"):
        _config(tmp_path / "c", *common, shared[0])


@pytest.mark.parametrize(("schedule", "warns"), [("cosine", True), ("constant_with_warmup", False)])
def test_a_longer_resumed_run_says_when_the_schedule_bends(tmp_path: Path, shared: list[str], schedule: str,
                                                            warns: bool, caplog: pytest.LogCaptureFixture) -> None:
    common = [*shared, "checkpoint.every=1", "optim.warmup_steps=0", f"optim.lr_scheduler={schedule}"]
    run(_config(tmp_path, *common, "optim.max_steps=1"))
    with caplog.at_level(logging.WARNING, logger="fashionshoot.training.checkpoint"):
        results = run(_config(tmp_path, *common, "optim.max_steps=2"))
    assert set(results["losses"]) == {2}
    said = [r.getMessage() for r in caplog.records if "max_steps 1 -> 2" in r.getMessage()]
    assert bool(said) == warns and all(f"the {schedule} learning-rate schedule" in m for m in said)


def test_fresh_start_refuses_folder_with_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "checkpoints" / "checkpoint-00000005").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-00000005" / STATE_NAME).write_text("{}")
    (tmp_path / "checkpoints" / ".tmp-checkpoint-00000009").mkdir()  # an interrupted save is never picked
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-00000005"]
    with pytest.raises(FashionshootError, match="checkpoint.resume=latest"):
        run(_config(tmp_path, "checkpoint.resume="))


def test_a_resume_that_would_mix_two_runs_is_refused_before_anything_is_written(tmp_path: Path,
                                                                                 shared: list[str]) -> None:
    """Resuming an earlier checkpoint beside later ones would have rotation delete the new checkpoints (it
    keeps the highest steps) and resume=latest continue the abandoned run; a refused resume must leave the
    finished run's files as they were."""
    common = [*shared, "checkpoint.every=1", "checkpoint.keep=5"]
    run(_config(tmp_path / "a", *common, "optim.max_steps=3"))
    second = tmp_path / "a" / "checkpoints" / "checkpoint-00000002"
    written = (tmp_path / "a" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"checkpoints after step 2.*checkpoint-00000003.*another output_dir"):
        run(_config(tmp_path / "a", *common, "optim.max_steps=4", f"checkpoint.resume={second}"))
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.002 -> 0\.005"):
        run(_config(tmp_path / "a", *common, "optim.max_steps=4", "optim.lr=5e-3"))
    assert (tmp_path / "a" / "config.yaml").read_text() == written
    branch = run(_config(tmp_path / "b", *common, "optim.max_steps=4", f"checkpoint.resume={second}"))
    assert set(branch["losses"]) == {3, 4} and branch["checkpoint"].is_dir()


def test_a_fresh_start_after_a_run_without_checkpoints_builds_its_own_base_and_validations(tmp_path: Path) -> None:
    """A run that died before its first checkpoint left a base and validations; starting again with another
    model.conditioning must not train the old base nor report the old validations, and a resume refuses a
    base that is not its own."""
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.training.loop import BASE_SOURCE

    first = run(_config(tmp_path, "optim.max_steps=1"))
    assert load_photoshoot_pipeline(first["pipeline"]).garment_adapter.config.conditioning == "cross_attention"
    shutil.rmtree(tmp_path / "checkpoints")
    earlier = (tmp_path / "validation" / "metrics.jsonl").read_text()
    again = run(_config(tmp_path, "optim.max_steps=1", "model.conditioning=reference"))
    assert load_photoshoot_pipeline(again["pipeline"]).garment_adapter.config.conditioning == "reference"
    (stale,) = tmp_path.glob("validation.stale-*")
    assert (stale / "metrics.jsonl").read_text() == earlier
    assert len((tmp_path / "validation" / "metrics.jsonl").read_text().splitlines()) == 1
    recorded = tmp_path / "base" / BASE_SOURCE
    recorded.write_text(json.dumps({**json.loads(recorded.read_text()), "seed": 3}))
    with pytest.raises(ConfigError, match=r"base was built for other settings than this run's checkpoint: seed: 3 -> 0$"):
        run(_config(tmp_path, "optim.max_steps=2", "model.conditioning=reference"))


def test_a_skipped_step_still_writes_its_checkpoint_and_is_logged(tmp_path: Path, shared: list[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = loop_module.training_loss, []

    def nan_at_the_last_step(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs) * (float("nan") if len(calls) == 3 else 1.0)

    monkeypatch.setattr(loop_module, "training_loss", nan_at_the_last_step)
    results = run(_config(tmp_path, *shared, "optim.max_steps=3", "checkpoint.every=3", "log_with=tensorboard",
                          "log_every=1"))
    assert results["nan_steps"] == 1 and set(results["losses"]) == {1, 2}
    assert results["checkpoint"].name == "checkpoint-00000003" and results["checkpoint"].is_dir()
    assert _scalars(tmp_path, "nan_steps") == {1: 0, 2: 0, 3: 1}  # logged too: a diverged run's logs say why
    assert set(_scalars(tmp_path, "loss")) == {1, 2}


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradients are not (e.g. an overflow in backward)."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def test_a_step_whose_pairs_all_weigh_zero_trains_on_nothing_instead_of_diverging(tmp_path: Path,
                                                                                 shared: list[str]) -> None:
    """Confidence 0 is a valid retrieval score: a step of such pairs has a zero weight sum (0/0 before), over
    two accumulated micro-batches; with zero gradients from the start and no weight decay, AdamW moves nothing."""
    manifest = _manifest_like(shared, tmp_path, lambda _, r: dataclasses.replace(r, confidence=0.0))
    results = run(_config(tmp_path / "run", f"data.manifest={manifest}", shared[1], "optim.max_steps=2",
                          "optim.batch_size=1", "optim.grad_accum=2", "optim.weight_decay=0", "max_nan_steps=0"))
    assert results["nan_steps"] == 0 and results["losses"] == {1: 0.0, 2: 0.0}
    base = saved_weights(Path(shared[1].split("=", 1)[1]))
    assert all(torch.equal(base[k], v) for k, v in saved_weights(results["pipeline"]).items())


def test_a_finite_loss_with_non_finite_gradients_is_skipped_too(tmp_path: Path, shared: list[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = loop_module.training_loss, []

    def nan_gradients_at_step_two(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append(1)
        loss = real(*args, **kwargs)
        return _NanGradient.apply(loss) if len(calls) == 2 else loss

    monkeypatch.setattr(loop_module, "training_loss", nan_gradients_at_step_two)
    results = run(_config(tmp_path, *shared, "optim.max_steps=3"))
    assert results["nan_steps"] == 1 and set(results["losses"]) == {1, 3}
    assert all(torch.isfinite(v).all() for v in saved_weights(results["pipeline"]).values())


def test_bad_config_key_is_named() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lrr"):
        config_from_argv(PhotoshootTrainConfig, ["optim.lrr=1e-4"], default_path=TINY_YAML)
    with pytest.raises(ConfigError, match=r"optim\.batch_size=0"):
        config_from_argv(PhotoshootTrainConfig, ["optim.batch_size=0"], default_path=TINY_YAML)
    with pytest.raises(ConfigError, match=r"unknown tier: data.curriculum\[1\]='hgih'"):  # not at step 6000
        config_from_argv(PhotoshootTrainConfig, ["data.curriculum=[[0, low], [6000, hgih]]"], default_path=TINY_YAML)
    with pytest.raises(ConfigError, match=r"dropout.garment/text/both .* got 0.05, 0.95, 0.05"):
        config_from_argv(PhotoshootTrainConfig, ["dropout.text=0.95"], default_path=TINY_YAML)


def test_script_takes_resume_flag_and_reports_command_line_errors_without_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    script = runpy.run_path(str(ROOT / "train" / "photoshoot.py"))
    assert script["parse"](["--resume", "runs/x/checkpoints/checkpoint-00000010", "optim.lr=0.1"]).checkpoint.resume \
        == "runs/x/checkpoints/checkpoint-00000010"
    assert script["parse"](["--resume", ""]).checkpoint.resume == ""
    assert script["parse"](["--resume=latest"]).checkpoint.resume == "latest"
    assert script["parse"]([]).checkpoint.resume == "latest"
    assert script["parse"](["mixed_precision=no"]).mixed_precision == "no"  # documented; YAML would read False
    assert script["main"](["--resume"]) == 2
    assert "--resume needs a value" in capsys.readouterr().err
    assert script["main"](["optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) optim.lrr" in err and "usage: train/photoshoot.py" in err and "Traceback" not in err
    assert script["main"](["--resume", "runs/no/such/checkpoint"]) == 2  # refused by the run, still no traceback
    assert "checkpoint.resume: runs/no/such/checkpoint is not a checkpoint folder" in capsys.readouterr().err


def test_non_finite_losses_stop_the_run(tmp_path: Path, shared: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real = loop_module.training_loss

    def nan_loss(*args: object, **kwargs: object) -> torch.Tensor:
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(loop_module, "training_loss", nan_loss)
    with pytest.raises(TrainingDiverged, match="max_nan_steps=1"):
        run(_config(tmp_path, *shared, "optim.max_steps=5", "max_nan_steps=1"))


def test_tier_selection_and_slot_mapping() -> None:
    from fashionshoot.data.records import PairRecord
    from fashionshoot.errors import DataError
    from fashionshoot.models.outfit import OUTFIT_SLOTS
    from fashionshoot.training.data import category_slot, select

    config = PhotoshootTrainConfig().data
    records = [PairRecord(f"p{i}", "g", "l", "g.png", "l.png", category="skirt", tier=tier)
               for i, tier in enumerate(("high", "medium", "low"))]
    config.tier = "medium"
    assert [r.tier for r in select(records, config, "train")] == ["high", "medium"]
    with pytest.raises(DataError, match="split 'test'"):
        select(records, config, "test")
    assert OUTFIT_SLOTS[category_slot("skirt", OUTFIT_SLOTS, config.slot_map)] == "bottom"
    with pytest.raises(DataError, match="'scarf'.*data.slot_map"):
        category_slot("scarf", OUTFIT_SLOTS, config.slot_map)


def _delta(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    return sum(float((trained[k] - base[k]).norm() ** 2) for k in base) ** 0.5


def test_gradient_accumulation_trains_what_one_larger_batch_would(tmp_path: Path, shared: list[str]) -> None:
    """grad_accum only splits a step: 4 x 1, 2 x 2 and 1 x 4 samples draw the same samples with the same
    randomness and take the weighted mean over all four (the synthetic pairs' confidences differ)."""
    common = [*shared, "optim.max_steps=3", "optim.warmup_steps=0", "checkpoint.every=3", "validation.num_pairs=1"]
    base = saved_weights(Path(shared[1].split("=", 1)[1]))
    runs = {n: run(_config(tmp_path / str(n), *common, f"optim.batch_size={4 // n}", f"optim.grad_accum={n}"))
            for n in (1, 2, 4)}
    one = saved_weights(runs[1]["pipeline"])
    for n in (2, 4):
        assert runs[n]["losses"] == pytest.approx(runs[1]["losses"], rel=1e-5)
        split = saved_weights(runs[n]["pipeline"])
        print(f"grad_accum={n}: relative weight difference {_delta(split, one) / _delta(one, base):.1e}")
        assert _delta(split, one) < 1e-3 * _delta(one, base)  # float summation order, amplified by Adam
    other_seed = saved_weights(run(_config(tmp_path / "seed", *common, "optim.batch_size=4", "seed=1"))["pipeline"])
    print(f"another seed: {_delta(other_seed, one) / _delta(one, base):.2f}")
    assert _delta(other_seed, one) > 0.1 * _delta(one, base)  # what a real difference looks like


def test_ema_resumes_exactly_and_lags_the_raw_weights(tmp_path: Path, shared: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    common = [*shared, "checkpoint.every=1", "checkpoint.keep=3", "optim.warmup_steps=0", "optim.max_steps=3"]
    base = saved_weights(Path(shared[1].split("=", 1)[1]))
    plain = run(_config(tmp_path / "plain", *common))
    straight = run(_config(tmp_path / "a", *common, "ema.decay=0.9"))
    killed_after(tmp_path / "a", 2, tmp_path / "b")
    real, moved = loop_module.load_checkpoint, []

    def recording(*args: object, on_device: list[object], **kwargs: object) -> object:
        moved.extend(on_device)
        return real(*args, on_device=on_device, **kwargs)

    monkeypatch.setattr(loop_module, "load_checkpoint", recording)
    resumed = run(_config(tmp_path / "b", *common, "ema.decay=0.9"))
    # accelerate loads the EMA onto the CPU: it goes back to the device (tests/test_training_checkpoint.py)
    assert [type(o).__name__ for o in moved] == ["EMAModel"]
    ema, raw = saved_weights(straight["pipeline"]), saved_weights(plain["pipeline"])
    assert straight["losses"] == plain["losses"]  # EMA only changes what is saved, not the trajectory
    assert all(torch.equal(ema[k], v) for k, v in saved_weights(resumed["pipeline"]).items())
    assert 0 < _delta(ema, base) < _delta(raw, base)


def test_lora_trains_adapters_and_saves_them_apart(tmp_path: Path, shared: list[str]) -> None:
    from diffusers import UNet2DConditionModel

    from fashionshoot.training.loop import LORA_DIR

    base_dir = Path(shared[1].split("=", 1)[1])
    results = run(_config(tmp_path, *shared, "optim.max_steps=2", "optim.warmup_steps=0", "model.lora_rank=4",
                          "optim.lr=1e-2"))
    base, trained = saved_weights(base_dir), saved_weights(results["pipeline"])
    assert base.keys() == trained.keys()  # fused and unloaded: a plain UNet again
    changed = {k.split(".")[-2] for k in base if k.startswith("unet.") and not torch.equal(base[k], trained[k])}
    assert changed == {"to_q", "to_k", "to_v", "0", "conv_in"}  # to_out.0 and the pose channels
    unet = UNet2DConditionModel.from_pretrained(base_dir / "unet")
    unet.load_lora_adapter(str(tmp_path / LORA_DIR), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    unet.fuse_lora()
    unet.unload_lora()
    lora_only = {k: v for k, v in unet.state_dict().items() if "conv_in" not in k}
    assert all(torch.allclose(v, trained[f"unet.{k}"], atol=1e-6) for k, v in lora_only.items())


def test_unsupported_distributed_modes_are_refused_with_the_reason() -> None:
    from accelerate.utils import DistributedType

    from fashionshoot.training.loop import check_distributed_type

    for supported in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed_type(supported)
    for stage in (0, 1, 2, 3):
        check_distributed_type(DistributedType.DEEPSPEED, {"zero_optimization": {"stage": stage},
                                                          "bf16": {"enabled": False}})
    check_distributed_type(DistributedType.DEEPSPEED, {"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}})
    with pytest.raises(ConfigError, match="DeepSpeed fp16.*half precision.*bf16"):
        check_distributed_type(DistributedType.DEEPSPEED, {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}})
    check_distributed_type(DistributedType.FSDP, fsdp_version=2)
    with pytest.raises(ConfigError, match="FSDP plugin version 1 .*--fsdp_version 2.*ZeRO-3.*DDP"):
        check_distributed_type(DistributedType.FSDP, fsdp_version=1)


def test_deepspeed_bf16_becomes_deepspeed_torch_autocast() -> None:
    from fashionshoot.training.loop import deepspeed_bf16_as_autocast

    fp32 = {"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    assert not deepspeed_bf16_as_autocast(fp32) and "torch_autocast" not in fp32
    ds = {"bf16": {"enabled": True}, "torch_autocast": {"lower_precision_safe_modules": ["torch.nn.Linear"]}}
    assert deepspeed_bf16_as_autocast(ds)
    assert ds == {"bf16": {"enabled": False}, "torch_autocast": {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": ["torch.nn.Linear"]}}


def test_a_run_in_another_precision_than_the_config_is_refused() -> None:
    from fashionshoot.training.loop import check_mixed_precision

    assert check_mixed_precision("bf16", "bf16", "bf16") is None
    assert check_mixed_precision("no", "no", None) is None
    with pytest.raises(ConfigError, match="mixed_precision='bf16' but accelerate runs 'no'.*DeepSpeed.*auto"):
        check_mixed_precision("bf16", "no", "bf16")  # a DeepSpeed config file with "bf16": {"enabled": false}
    note = check_mixed_precision("no", "no", "bf16")
    assert note is not None and "mixed_precision=bf16" in note


def test_a_lone_cpu_process_on_fewer_threads_than_cores_gets_a_note() -> None:
    from fashionshoot.training.loop import cpu_threads_note, physical_cores

    note = cpu_threads_note("cpu", 1, 1, 2)  # a bare accelerate launch on a 2-core machine
    assert note is not None and "1 CPU thread(s) of this machine's 2 cores" in note and "--num_cpu_threads_per_process 2" in note
    assert cpu_threads_note("cpu", 1, 2, 2) is None
    assert cpu_threads_note("cpu", 2, 1, 2) is None  # processes share the cores
    assert cpu_threads_note("cuda", 1, 1, 2) is None
    assert physical_cores() >= 1


def test_a_launch_whose_processes_did_not_join_is_refused() -> None:
    from fashionshoot.training.loop import check_process_count

    check_process_count(launched=1, joined=1)
    check_process_count(launched=2, joined=2)
    with pytest.raises(ConfigError, match="started 2 processes but accelerate joined 1.*ACCELERATE_USE_CPU"):
        check_process_count(launched=2, joined=1)


@pytest.mark.parametrize(("override", "refused"), [
    ("optim.max_grad_norm=0", "optim.max_grad_norm=0.0 (must be > 0)"),  # 0 would zero every gradient
    ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0 (must be > 0)"),  # and a negative norm flip them
    ("optim.lr=0", "optim.lr=0.0 (must be > 0)"),
    ("optim.warmup_steps=-5", "optim.warmup_steps=-5 (must be >= 0)"),
    ("validation.every=-1", "validation.every=-1 (must be >= 0)"),
    ("validation.num_pairs=-3", "validation.num_pairs=-3 (must be >= 0)"),
    ("data.resolution=[0, 24]", "data.resolution[0]=0 (must be at least 1)"),
    ("data.resolution=[32, -8]", "data.resolution[1]=-8 (must be at least 1)"),
    ("data.min_confidence=1.5", "data.min_confidence=1.5 (must be in [0, 1])"),
    ("data.weight_power=-1", "data.weight_power=-1.0 (must be >= 0)"),
    ("loss.garment_weight=-3", "loss.garment_weight=-3.0 (must be >= 0)"),
    ("ema.decay=1", "ema.decay=1.0 (must be in [0, 1))"),
])
def test_a_number_out_of_its_range_is_refused_naming_key_and_range(override: str, refused: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(refused)):
        config_from_argv(PhotoshootTrainConfig, [override], default_path=TINY_YAML)


def test_lora_and_full_unet_training_exclude_each_other() -> None:
    with pytest.raises(ConfigError, match="lora_rank"):
        config_from_argv(PhotoshootTrainConfig, ["model.lora_rank=4", "model.train_unet=true"], default_path=TINY_YAML)


def test_tensorboard_logging_and_8bit_adam(tmp_path: Path, shared: list[str]) -> None:
    results = run(_config(tmp_path, *shared, "optim.max_steps=2", "optim.warmup_steps=0", "log_with=tensorboard",
                          "log_every=1", "optim.optimizer=adamw8bit"))
    base, trained = saved_weights(Path(shared[1].split("=", 1)[1])), saved_weights(results["pipeline"])
    assert _delta(trained, base) > 0
    assert _scalars(tmp_path, "loss") == pytest.approx(results["losses"])


def test_wandb_logs_offline_into_the_run_folder(tmp_path: Path, shared: list[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No account and no network: ``WANDB_MODE=offline`` writes the run under ``<output_dir>/wandb``, with
    the config, every step's loss and the validation metrics (what ``wandb sync`` would upload)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    results = run(_config(tmp_path, *shared, "optim.max_steps=2", "log_with=wandb", "log_every=1"))
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    logged = log.read_bytes()  # protobuf records: keys and JSON-encoded values are stored as plain bytes
    assert b"optim.lr" in logged and b"val/garment_r@1" in logged
    assert set(results["losses"]) == {1, 2}
    for loss in results["losses"].values():
        assert json.dumps(loss).encode() in logged


def test_gradient_checkpointing_changes_memory_not_results(tmp_path: Path, shared: list[str]) -> None:
    common = [*shared, "optim.max_steps=2", "optim.warmup_steps=0", "model.train_unet=true"]
    plain = run(_config(tmp_path / "plain", *common))
    checkpointed = run(_config(tmp_path / "ckpt", *common, "model.gradient_checkpointing=true"))
    assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    a, b = saved_weights(plain["pipeline"]), saved_weights(checkpointed["pipeline"])
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_min_snr_weights_and_noise_offset(tmp_path: Path, shared: list[str]) -> None:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from fashionshoot.training.loop import min_snr_weights

    scheduler = DDPMScheduler(beta_schedule="scaled_linear")
    timesteps = torch.tensor([0, 50, 500, 999])
    snr = compute_snr(scheduler, timesteps)
    weights = min_snr_weights(scheduler, timesteps, gamma=5.0)
    assert torch.allclose(weights, torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert weights[0] < weights[1] < 1.0 and weights[-1] == 1.0  # only low-noise (high-SNR) steps are damped
    assert torch.equal(min_snr_weights(scheduler, timesteps, gamma=0.0), torch.ones(4))

    common = [*shared, "optim.max_steps=1", "optim.warmup_steps=0"]
    plain = run(_config(tmp_path / "plain", *common))
    weighted = run(_config(tmp_path / "snr", *common, "loss.snr_gamma=5", "loss.noise_offset=0.1"))
    assert 0 < weighted["losses"][1] != plain["losses"][1]
    region = run(_config(tmp_path / "region", *common, "loss.garment_weight=4"))
    assert 0 < region["losses"][1] != plain["losses"][1]


def test_garment_region_weights_follow_the_box() -> None:
    from fashionshoot.training.loop import garment_region_weights

    boxes = torch.tensor([[4.0, 8.0, 12.0, 20.0], [float("nan")] * 4, [0.0, 0.0, 24.0, 32.0]])
    weights = garment_region_weights(boxes, (32, 24), (16, 12), garment_weight=3.0)
    assert weights.shape == (3, 1, 16, 12)
    assert torch.allclose(weights.mean(dim=(1, 2, 3)), torch.ones(3))  # the loss keeps its scale
    inside = torch.zeros(16, 12, dtype=torch.bool)
    inside[4:10, 2:6] = True  # latent cells (2 px) overlapping x 4-12, y 8-20
    boxed = weights[0, 0]
    assert torch.allclose(boxed[inside], torch.full((24,), 4.0 * boxed[~inside][0]))
    assert torch.equal(boxed[~inside], torch.full((168,), boxed[~inside][0]))
    assert torch.equal(weights[1], torch.ones(1, 16, 12)) and torch.equal(weights[2], torch.ones(1, 16, 12))


def test_collated_garment_box_is_in_training_pixels() -> None:
    from transformers import CLIPImageProcessor

    from fashionshoot.data.records import PairRecord
    from fashionshoot.models.outfit import OUTFIT_SLOTS
    from fashionshoot.training.data import PhotoshootCollator

    def sample(box: tuple[float, float, float, float] | None) -> dict:
        record = PairRecord("p", "g", "l", "g.png", "l.png", category="top", crop_box=box)
        return {"record": record, "garment": Image.new("RGB", (8, 8)), "lookbook": Image.new("RGB", (48, 64)),
                "weight": 1.0}

    processor = CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})
    collator = PhotoshootCollator(processor, OUTFIT_SLOTS, {}, (32, 24))
    boxes = collator([sample((6.0, 10.0, 30.0, 50.0)), sample(None)])["garment_box"]
    assert torch.equal(boxes[0], torch.tensor([3.0, 5.0, 15.0, 25.0]))  # lookbook 64x48 -> training 32x24
    assert torch.isnan(boxes[1]).all()
    reads = {c: {"garment_clip", "garment_vae"} & set(PhotoshootCollator(processor, OUTFIT_SLOTS, {}, (32, 24), c)([sample(None)]))
             for c in ("cross_attention", "reference", "both")}
    assert reads == {"cross_attention": {"garment_clip"}, "reference": {"garment_vae"},
                     "both": {"garment_clip", "garment_vae"}}  # only what the adapter reads is built


def test_curriculum_moves_from_broad_to_high_tier(tmp_path: Path, shared: list[str]) -> None:
    from fashionshoot.pipelines.photoshoot import load_photoshoot_pipeline
    from fashionshoot.training.data import PhotoshootCollator, stage_batches

    tiers = ("high", "medium", "low")
    manifest = _manifest_like(shared, tmp_path, lambda i, r: dataclasses.replace(r, tier=tiers[i % 3]))
    records = read_manifest(manifest)
    config = _config(tmp_path / "run", f"data.manifest={manifest}", shared[1], "data.curriculum=[[0, low], [2, high]]",
                     "optim.max_steps=3")
    pipe = load_photoshoot_pipeline(config.model.pretrained)
    collator = PhotoshootCollator(pipe.feature_extractor, pipe.slots, config.data.slot_map, config.data.resolution)
    tier_of = {r.pair_id: r.tier for r in records}

    def tiers_seen(step: int, batches: int) -> set[str]:
        _, stream = stage_batches(records, tmp_path, config.data, collator, 4, 0, 0, 1, step, 1)
        return {tier_of[p] for _ in range(batches) for p in next(stream)["pair_ids"]}

    assert tiers_seen(0, 6) == {"high", "medium", "low"}
    assert tiers_seen(2, 6) == {"high"}
    assert run(config)["step"] == 3
    with pytest.raises(ConfigError, match="curriculum"):
        _config(tmp_path, "data.curriculum=[[5, low], [2, high]]")


def test_fp16_on_the_cpu_is_refused_with_the_reason(tmp_path: Path, shared: list[str]) -> None:
    with pytest.raises(ConfigError, match="fp16 on the CPU: accelerate does not autocast there.*use bf16"):
        run(_config(tmp_path, *shared, "optim.max_steps=1", "mixed_precision=fp16", "cpu=true"))
    assert not (tmp_path / "config.yaml").exists()


def test_bf16_mixed_precision_trains_and_saves_fp32(tmp_path: Path, shared: list[str]) -> None:
    results = run(_config(tmp_path, *shared, "optim.max_steps=2", "optim.warmup_steps=0", "mixed_precision=bf16",
                          "validation.every=1"))  # validation mid-run sees bf16 encoders, fp32 trained parts
    assert all(0 < loss < 10 for loss in results["losses"].values())
    trained = saved_weights(results["pipeline"])
    assert {v.dtype for v in trained.values()} == {torch.float32}
    assert _delta(trained, saved_weights(Path(shared[1].split("=", 1)[1]))) > 0


def test_prediction_type_is_retargeted_and_saved(tmp_path: Path, shared: list[str]) -> None:
    from diffusers import DDIMScheduler

    results = run(_config(tmp_path, *shared, "optim.max_steps=1", "model.prediction_type=sample"))
    assert DDIMScheduler.from_pretrained(results["pipeline"], subfolder="scheduler").config.prediction_type == "sample"
    assert 0 < results["losses"][1] < 10
