"""PhotoshootPipeline end to end on a tiny random pipeline folder, loaded through fashionshoot.weights."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from PIL import Image

from fashionshoot.data.pose import convert_keypoints
from fashionshoot.errors import ConfigError, DataError, MissingWeightsError
from fashionshoot.pipelines.cli import generate_main
from fashionshoot.pipelines.photoshoot import PhotoshootPipeline, load_photoshoot_pipeline
from fashionshoot.pipelines.testing import save_tiny_photoshoot_pipeline

STEPS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_photoshoot_pipeline(tmp_path_factory.mktemp("photoshoot"), conditioning="both")


@pytest.fixture(scope="module")
def pipe(folder) -> PhotoshootPipeline:
    pipe = load_photoshoot_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 30, 3), dtype=np.uint8))


def _pose(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(2, 30, size=(18, 2)).astype(np.float32)


def _run(pipe, garments=None, keypoints=None, seed=0, **kwargs) -> np.ndarray:
    kwargs = {"prompt": "a rooftop at dusk", "num_inference_steps": STEPS, "output_type": "np", **kwargs}
    generator = kwargs.pop("generator", torch.Generator().manual_seed(seed))
    keypoints = _pose() if keypoints is None else keypoints
    return pipe(garments=garments, keypoints=keypoints, generator=generator, **kwargs).images


TOP, BOTTOM, BAG = _image(1), _image(2), _image(3)


def test_pipeline_round_trips_exactly(pipe, tmp_path):
    out = _run(pipe, {"top": TOP, "bottom": BOTTOM})
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
    pipe.save_pretrained(tmp_path)
    reloaded = load_photoshoot_pipeline(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(_run(reloaded, {"top": TOP, "bottom": BOTTOM}), out)


def test_every_model_component_has_its_place_in_the_cpu_offload_order(pipe):
    models = {name for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)}
    assert models == set(pipe.model_cpu_offload_seq.split("->"))


def test_slot_order_is_fixed_and_empty_slots_are_ignored(pipe):
    out = _run(pipe, {"bottom": BOTTOM, "top": TOP})
    np.testing.assert_array_equal(_run(pipe, {"top": TOP, "bottom": BOTTOM, "bag": None}), out)
    np.testing.assert_array_equal(_run(pipe, [TOP, None, BOTTOM]), out)
    assert not np.allclose(_run(pipe, {"top": BOTTOM, "bottom": TOP}), out, atol=1e-3)
    assert not np.allclose(_run(pipe, {"top": TOP, "bottom": BOTTOM, "bag": BAG}), out, atol=1e-3)
    np.testing.assert_array_equal(_run(pipe, None), _run(pipe, {}))  # text + pose only


def test_guidance_scales_matter_and_unit_scales_run_one_branch(pipe):
    garments = {"top": TOP}
    unit = _run(pipe, garments, guidance_scale_text=1.0, guidance_scale_garment=1.0)
    assert not np.allclose(_run(pipe, garments, guidance_scale_text=5.0, guidance_scale_garment=1.0), unit, atol=1e-3)
    assert not np.allclose(_run(pipe, garments, guidance_scale_text=1.0, guidance_scale_garment=5.0), unit, atol=1e-3)


def test_batches_are_reproducible_per_sample_generator(pipe):
    outfits = [{"top": TOP}, {"bottom": BOTTOM, "bag": BAG}]
    poses = [_pose(0), _pose(1)]
    batch = _run(pipe, outfits, poses, generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    assert batch.shape[0] == 2
    np.testing.assert_allclose(batch[1], _run(pipe, outfits[1], poses[1], seed=8)[0], atol=1e-5)
    np.testing.assert_array_equal(_run(pipe, outfits, poses, seed=3), _run(pipe, outfits, poses, seed=3))

    without = _run(pipe, [{"top": TOP}, None], generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
                   negative_prompt=None)  # None: a sample without garments, no negative text (diffusers' default)
    np.testing.assert_allclose(without[1], _run(pipe, None, seed=8, negative_prompt="")[0], atol=1e-5)

    images = _run(pipe, {"top": TOP}, num_images_per_prompt=2)
    assert images.shape[0] == 2 and not np.allclose(images[0], images[1], atol=1e-3)


@pytest.mark.parametrize("scheduler_cls", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_schedulers_are_swappable(pipe, scheduler_cls):
    original = pipe.scheduler
    pipe.scheduler = scheduler_cls.from_config(original.config)
    try:
        out = _run(pipe, {"top": TOP}, num_inference_steps=3)
        assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()
        np.testing.assert_array_equal(_run(pipe, {"top": TOP}, num_inference_steps=3), out)
    finally:
        pipe.scheduler = original


def test_pose_transfer_and_outfit_transfer_share_noise(pipe):
    posed = pipe.pose_transfer({"top": TOP}, [_pose(0), _pose(0), _pose(5)], num_inference_steps=STEPS,
                               generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(posed[0], posed[1], atol=1e-5)
    assert not np.allclose(posed[0], posed[2], atol=1e-3)

    swapped = pipe.outfit_transfer({"top": TOP, "bottom": BOTTOM}, [{}, {}, {"bottom": BAG}], keypoints=_pose(),
                                   num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                                   output_type="np").images
    np.testing.assert_allclose(swapped[0], swapped[1], atol=1e-5)
    assert not np.allclose(swapped[0], swapped[2], atol=1e-3)


def test_same_noise_also_shares_the_per_step_noise_of_a_stochastic_scheduler(pipe):
    original = pipe.scheduler
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(original.config)  # draws noise at every step
    try:
        swapped = pipe.outfit_transfer({"top": TOP}, [{}, {}], keypoints=_pose(), num_inference_steps=STEPS,
                                       generator=torch.Generator().manual_seed(0), output_type="np").images
        np.testing.assert_allclose(swapped[0], swapped[1], atol=1e-5)

        # Two noises per pose, one generator each: image i * 2 + j has pose i and noise j.
        posed = pipe.pose_transfer({"top": TOP}, [_pose(0), _pose(0)], num_images_per_prompt=2,
                                   num_inference_steps=STEPS, output_type="np",
                                   generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
        np.testing.assert_allclose(posed[0], posed[2], atol=1e-5)
        np.testing.assert_allclose(posed[1], posed[3], atol=1e-5)
        assert not np.allclose(posed[0], posed[1], atol=1e-3)
    finally:
        pipe.scheduler = original


def test_adapter_sized_for_another_unet_is_refused(pipe):
    from fashionshoot import testing
    from fashionshoot.models.garment_adapter import GarmentAdapter

    other_levels = testing.tiny_unet(sample_size=16, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None)
    with pytest.raises(ConfigError, match=r"cross-attention layers the adapter lacks: down_blocks\.1\.attentions.*"
                                          r"adapter cross-attention layers the UNet lacks: down_blocks\.0\.attentions"):
        PhotoshootPipeline(**{**pipe.components, "unet": other_levels})
    config = dict(pipe.garment_adapter.config)
    wider = GarmentAdapter.from_config({**config, "reference_dims": [2 * d for d in config["reference_dims"]]})
    with pytest.raises(ConfigError, match=r"reference \(self-attention\) widths differ: down_blocks\.0\S* "
                                          r"\(adapter 64, UNet 32\)"):
        PhotoshootPipeline(**{**pipe.components, "garment_adapter": wider})


def test_mpii16_keypoints_and_keypoints_outside_the_image(pipe):
    mpii = np.random.default_rng(4).uniform(2, 30, size=(16, 3)).astype(np.float32)
    mpii[:, 2] = 1
    np.testing.assert_array_equal(_run(pipe, {"top": TOP}, mpii),
                                  _run(pipe, {"top": TOP}, convert_keypoints(mpii, "mpii16", "coco18")))
    far = _pose()
    far[:4] = [[-100, 5], [500, 500], [5, -40], [1e5, 3]]
    assert np.isfinite(_run(pipe, {"top": TOP}, far)).all()


def test_bad_inputs_raise_clear_errors(pipe):
    with pytest.raises(DataError, match=r"'hat'.*top, outerwear, bottom, dress, shoes, bag"):
        _run(pipe, {"hat": TOP})
    with pytest.raises(DataError, match="slot 'shoes'.*PIL"):
        _run(pipe, {"top": TOP, "shoes": "shoes.jpg"})
    with pytest.raises(DataError, match="accepted joint counts"):
        _run(pipe, {"top": TOP}, np.zeros((17, 3)))
    with pytest.raises(DataError, match="shape"):
        _run(pipe, {"top": TOP}, np.zeros((18, 6)))
    with pytest.raises(DataError, match="disagree"):
        _run(pipe, [{"top": TOP}, {"top": BAG}], prompt=["a", "b", "c"])
    with pytest.raises(DataError, match="3 generators for 2 noises"):
        _run(pipe, [{"top": TOP}, {"top": BAG}], generator=[torch.Generator().manual_seed(s) for s in range(3)])
    with pytest.raises(DataError, match="bare PIL image.*garments={'top': image}"):
        _run(pipe, TOP)
    with pytest.raises(DataError, match=r"at least 1: num_images_per_prompt=0, num_inference_steps=0"):
        _run(pipe, {"top": TOP}, num_images_per_prompt=0, num_inference_steps=0)
    with pytest.raises(DataError, match=r"latents have shape \(1, 4, 8, 8\); expected \(2, 4, 16, 16\)"):
        _run(pipe, [{"top": TOP}, {"top": BAG}], latents=torch.randn(1, 4, 8, 8))
    with pytest.raises(DataError, match="positive multiples of 2, got -32x32"):
        _run(pipe, {"top": TOP}, height=-32)


def test_replaced_attention_processors_are_refused_and_xformers_keeps_them(folder, caplog):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from fashionshoot.models.garment_adapter import install_garment_attention

    pipe = load_photoshoot_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    before = {name: type(p) for name, p in pipe.unet.attn_processors.items()}
    with caplog.at_level("WARNING", logger="fashionshoot.pipelines.photoshoot"):
        pipe.enable_xformers_memory_efficient_attention()  # would install processors that ignore the garment
    assert {name: type(p) for name, p in pipe.unet.attn_processors.items()} == before
    assert "keeps its garment attention processors" in caplog.text
    expected = _run(pipe, {"top": TOP})
    pipe.unet.set_attn_processor(AttnProcessor2_0())  # (diffusers' set_default_attn_processor refuses ours)
    with pytest.raises(ConfigError, match=r"not garment processors .*AttnProcessor.*install_garment_attention"):
        _run(pipe, {"top": TOP})
    install_garment_attention(pipe.unet)
    assert np.array_equal(_run(pipe, {"top": TOP}), expected)


def test_textual_inversion_token_as_negative_prompt(folder):
    pipe = load_photoshoot_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    plain = _run(pipe, {"top": TOP}, negative_prompt="")
    pipe.load_textual_inversion({"<rendered>": torch.randn(2, 32)}, token="<rendered>")
    assert not np.allclose(_run(pipe, {"top": TOP}, negative_prompt="<rendered>"), plain, atol=1e-3)


def test_folder_without_adapter_is_a_missing_weights_error(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken, ignore=shutil.ignore_patterns("garment_adapter"))
    with pytest.raises(MissingWeightsError, match="garment_adapter"):
        load_photoshoot_pipeline(broken)
    (broken / "garment_adapter").mkdir()
    shutil.copy(folder / "garment_adapter" / "config.json", broken / "garment_adapter")
    with pytest.raises(MissingWeightsError, match="GarmentAdapter|garment_adapter"):
        load_photoshoot_pipeline(broken)


def test_generate_cli_writes_pngs(folder, tmp_path, capsys):
    (tmp_path / "top.png").parent.mkdir(exist_ok=True)
    TOP.save(tmp_path / "top.png")
    (tmp_path / "pose.json").write_text(json.dumps({"keypoints": (_pose() * 2).tolist(), "size": [64, 64]}))
    argv = [f"pipeline={folder}", f"garments.top={tmp_path / 'top.png'}", f"keypoints={tmp_path / 'pose.json'}",
            "prompt=a beach", "steps=2", "num_images=2", "scheduler=euler", f"out_dir={tmp_path / 'out'}"]
    assert generate_main(argv) == 0
    written = sorted((tmp_path / "out").glob("*.png"))
    assert len(written) == 2 and Image.open(written[0]).size == (32, 32)
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["height"], saved["width"]) == (32, 32)  # the size used, though the command gave none
    (tmp_path / "seventeen.json").write_text(json.dumps(np.zeros((17, 3)).tolist()))
    assert generate_main([*argv[:2], f"keypoints={tmp_path / 'seventeen.json'}", f"out_dir={tmp_path / 'bad'}"]) == 1
    assert re.search(r"seventeen\.json: got 17 keypoints; accepted joint counts", capsys.readouterr().err)
    assert generate_main([f"pipeline={folder}", f"garments.hat={tmp_path / 'top.png'}",
                          f"out_dir={tmp_path / 'bad'}"]) == 1


def _eval_generation_module():
    spec = importlib.util.spec_from_file_location("eval_generation", Path(__file__).parents[1] / "eval" / "generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_generate_over_a_manifest_split_writes_what_eval_generation_reads(folder, tmp_path, capsys):
    from fashionshoot.data.pairs import read_manifest
    from fashionshoot.data.synthetic import SyntheticConfig, write_synthetic_set

    data = write_synthetic_set(tmp_path / "synthetic", SyntheticConfig(num_garments=8, lookbooks_per_garment=2,
                                                                        styles=("real",)))
    test_pairs = [r for r in read_manifest(data / "pairs.jsonl") if r.split == "test"]
    assert len(test_pairs) == 4  # garments 1 and 3, two lookbooks each
    out = tmp_path / "test set"  # the printed command must quote it
    argv = [f"pipeline={folder}", f"pairs={data / 'pairs.jsonl'}", "split=test", "steps=2", "height=32", "width=24",
            "batch_size=3", f"out_dir={out}"]
    assert generate_main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == [str(out / "generated" / f"{r.pair_id}.png") for r in test_pairs]
    for kind in ("generated", "references"):
        files = sorted((out / kind).glob("*.png"))
        assert [f.stem for f in files] == sorted(r.pair_id for r in test_pairs)
        assert {Image.open(f).size for f in files} == {(24, 32)}
    rows = list(csv.DictReader(open(out / "pairs.csv", newline="")))
    assert [(r["generated"], r["reference"], r["category"], r["garment"]) for r in rows] == \
        [(p.pair_id, p.pair_id, p.category, p.garment_id) for p in test_pairs]
    assert rows[0]["caption"] == test_pairs[0].metadata["caption"]
    assert sorted(f.stem for f in (out / "garments").glob("*.png")) == sorted({p.garment_id for p in test_pairs})
    with Image.open(out / "references" / f"{test_pairs[0].pair_id}.png") as ref, \
            Image.open(data / test_pairs[0].lookbook_image) as truth:
        assert np.array_equal(np.asarray(ref), np.asarray(truth.convert("RGB").resize((24, 32), Image.BICUBIC)))

    command = printed[-1].removeprefix("evaluate with: python eval/generation.py ")
    report = _eval_generation_module().main([*shlex.split(command), "metrics=[ssim]", f"out_dir={tmp_path / 'eval'}"])
    assert report.get("ssim").n == 4 and {r.category for r in report.results} == {"skirt", "trousers", "all"}

    assert generate_main([*argv, f"garments.top={data / test_pairs[0].garment_image}", "prompt=a beach"]) == 1
    assert "drop garments, prompt" in capsys.readouterr().err
    single = [f"pipeline={folder}", "steps=2", f"out_dir={tmp_path / 'one'}"]
    assert generate_main([*single, "split=val", "num_pairs=3"]) == 1  # not silently ignored
    assert "split, num_pairs apply only with pairs=" in capsys.readouterr().err
    assert generate_main([*argv, "split=val"]) == 1
    assert "no pairs in split 'val'" in capsys.readouterr().err
