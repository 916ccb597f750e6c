"""eval/generation.py end to end on small folders: outputs, categories, clean-fid equality, bad input."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from fashionshoot.errors import DataError, MissingWeightsError
from fashionshoot.metrics import Extractors

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("eval_generation", ROOT / "eval" / "generation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


gen_eval = _module()


def _write(folder: Path, names: list[str], seed: int, size=(64, 72)) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        path = folder / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, (1, 1, 3))
        noise = rng.integers(0, 60, (size[1], size[0], 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(path)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(8, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 255)


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path]:
    names = [f"{c}/{i:08d}_0" for c in ("dresses", "upper_body") for i in range(12)]
    _write(tmp_path / "gen", names, seed=1)
    _write(tmp_path / "gt", names, seed=2)
    return tmp_path / "gen", tmp_path / "gt"


@pytest.fixture()
def lpips_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    return tmp_path


def _cfg(tmp_path, gen, gt, lpips_dir=None, **overrides):
    cfg = gen_eval.GenerationEvalConfig(
        generated=[str(gen)], references=[str(gt)], out_dir=str(tmp_path / "out"), batch_size=5,
        metrics=["fid", "kid", "lpips", "ssim", "psnr"], kid_subset_size=10, kid_subsets=4, label="tiny",
    )
    if lpips_dir is not None:
        cfg.weights.search_dirs = [str(lpips_dir)]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_main_writes_json_markdown_and_config(tmp_path, folders, lpips_dir, monkeypatch):
    gen, gt = folders
    from fashionshoot.metrics import extractors

    # The Inception file cannot exist offline: inject the tiny extractor where load_inception returns it.
    monkeypatch.setattr(extractors, "load_inception", lambda *a, **k: Tiny())
    report = gen_eval.main([f"generated=[{gen}]", f"references=[{gt}]", f"out_dir={tmp_path / 'out'}",
                            "metrics=[fid,kid,lpips,ssim]", "kid_subset_size=10", "kid_subsets=3",
                            f"weights.search_dirs=[{lpips_dir}]", "label=tiny", "batch_size=7"])
    out = tmp_path / "out"
    data = json.loads((out / "metrics.json").read_text())
    assert data["protocol"]["name"] == "fashionshoot-v1+custom" and data["setting"] == "paired"
    cats = {(r["metric"], r["category"]) for r in data["results"]}
    assert cats == {(m, c) for m in ("fid", "kid", "lpips", "ssim") for c in ("dresses", "upper_body", "all")}
    kid_all = report.get("kid")
    assert kid_all.n == 24 and kid_all.details["subset_size_used"] == 10 and kid_all.protocol["kid_subsets"] == 3
    assert report.get("lpips").protocol["extractor"]["weights_file"] == "alexnet-owt-7be5be79.pth"
    md = (out / "metrics.md").read_text()
    assert md.count("\n") == 5 and "| tiny | fashionshoot-v1+custom | paired | all | 24 |" in md
    assert "kid_subset_size: 10" in (out / "config.yaml").read_text()


def test_aggregate_is_the_union_not_the_mean_of_categories(tmp_path, folders, lpips_dir):
    gen, gt = folders
    report = gen_eval.run(_cfg(tmp_path, gen, gt, lpips_dir, metrics=["fid", "ssim"]),
                          Extractors(inception=Tiny()))
    flat = tmp_path / "flat"
    for sub in ("gen", "gt"):
        for p in (tmp_path / sub).rglob("*.png"):
            (flat / sub).mkdir(parents=True, exist_ok=True)
            (flat / sub / f"{p.parent.name}_{p.name}").write_bytes(p.read_bytes())
    union = gen_eval.run(_cfg(tmp_path, flat / "gen", flat / "gt", metrics=["fid", "ssim"]),
                         Extractors(inception=Tiny()))
    assert report.get("fid").value == pytest.approx(union.get("fid").value, rel=1e-5)
    assert report.get("ssim").value == pytest.approx(union.get("ssim").value, rel=1e-6)


def test_fid_and_kid_equal_clean_fid_on_folders(tmp_path, folders):
    from cleanfid import fid as clean_fid

    gen, gt = folders
    tiny = Tiny()
    cfg = _cfg(tmp_path, gen, gt, metrics=["fid", "kid"], protocol="fashion-rag", kid_subset_size=None)
    report = gen_eval.run(cfg, Extractors(inception=tiny))
    ref_fid = clean_fid.compute_fid(str(gt), str(gen), mode="clean", custom_feat_extractor=tiny, num_workers=0,
                                    batch_size=8, device=torch.device("cpu"), verbose=False, use_dataparallel=False)
    kw = dict(num_workers=0, batch_size=8, device=torch.device("cpu"), verbose=False, mode="clean")
    with torch.no_grad():
        f_gt = clean_fid.get_folder_features(str(gt), tiny, **kw)
        f_gen = clean_fid.get_folder_features(str(gen), tiny, **kw)
    ref_kid = clean_fid.kernel_distance(f_gt.astype(np.float64), f_gen.astype(np.float64), num_subsets=1)
    assert report.get("fid").value == pytest.approx(ref_fid, rel=1e-4)
    kid = report.get("kid")  # fashion-rag: clean-fid's subset shrinking (24 < 1000) and KID x 10^3
    assert kid.scale == 1000.0 and kid.details["subset_size_used"] == 24
    assert kid.value == pytest.approx(1000 * ref_kid, rel=1e-4)


def test_shards_and_first_digit_pairing(tmp_path, folders):
    gen, gt = folders
    shard = tmp_path / "gen.tar"
    with tarfile.open(shard, "w") as tar:
        for p in sorted(gen.rglob("*.png")):
            tar.add(p, arcname=f"{p.parent.name}/pred_{p.stem}.png")  # CatVTON names: first 8 digits pair
    report = gen_eval.run(_cfg(tmp_path, shard, gt, metrics=["ssim"], pairing="first-digits"), Extractors())
    direct = gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["ssim"]), Extractors())
    assert report.get("ssim").value == pytest.approx(direct.get("ssim").value, rel=1e-6)


def test_bad_input_is_an_error_or_skipped_and_reported(tmp_path, folders):
    gen, gt = folders
    (gen / "dresses" / "00000003_0.png").write_bytes(b"not a png")
    (gt / "dresses" / "99999999_0.png").write_bytes((gt / "dresses" / "00000001_0.png").read_bytes())
    with pytest.raises(DataError, match="mismatched counts"):
        gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["ssim"]), Extractors())
    (gt / "dresses" / "99999999_0.png").unlink()
    with pytest.raises(DataError, match="00000003_0.png"):
        gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["ssim"]), Extractors())
    with pytest.raises(DataError, match="KID: category 'dresses' has 12 generated"):
        gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["kid"], kid_subset_size=50), Extractors(inception=Tiny()))
    report = gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["ssim", "kid"], kid_subset_size=12, skip_bad=True),
                          Extractors(inception=Tiny()))
    assert report.faults["counts"] == {"unreadable image": 1}
    assert report.get("ssim", "dresses").n == 11
    assert "kid/dresses" in report.skipped_metrics  # 11 < 12: skipped and reported
    assert report.get("kid").n == 23


def test_missing_weights_name_the_file(tmp_path, folders, monkeypatch):
    gen, gt = folders
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.delenv("FASHIONSHOOT_WEIGHTS", raising=False)
    with pytest.raises(MissingWeightsError, match="inception-2015-12-05.pt"):
        gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["fid"]))
    with pytest.raises(MissingWeightsError, match="squeezenet1_1-b8a52dc0.pth"):
        gen_eval.run(_cfg(tmp_path, gen, gt, metrics=["lpips"], protocol="catvton"))


def test_uncategorised_images_go_to_one_bucket_whatever_the_batch_size(tmp_path):
    names = ["a1", "a2", "a3", "b/b1", "b/b2", "b/b3"]  # three flat files beside a category folder "b"
    _write(tmp_path / "gen", names, seed=1, size=(32, 32))
    _write(tmp_path / "gt", names, seed=2, size=(32, 32))
    rows = {}
    for batch_size in (2, 16):  # batch_size 2 puts a1, a2 in an all-uncategorised batch
        report = gen_eval.run(_cfg(tmp_path, tmp_path / "gen", tmp_path / "gt", metrics=["psnr"],
                                   batch_size=batch_size), Extractors())
        rows[batch_size] = [(r.category, r.n, r.value) for r in report.results]
    assert rows[2] == rows[16]
    assert [(c, n) for c, n, _ in rows[2]] == [("uncategorised", 3), ("b", 3), ("all", 6)]


def test_a_category_named_all_is_refused(tmp_path):
    _write(tmp_path / "gen", ["all/x1", "b/x2"], seed=1, size=(32, 32))
    _write(tmp_path / "gt", ["all/x1", "b/x2"], seed=2, size=(32, 32))
    with pytest.raises(DataError, match="category 'all' is reserved"):
        gen_eval.run(_cfg(tmp_path, tmp_path / "gen", tmp_path / "gt", metrics=["psnr"]), Extractors())


class _FakeClip:
    """A CLIP backend from image colours and caption lengths (the rows skipped are what is under test)."""

    from fashionshoot.metrics.extractors import ExtractorInfo

    extractor_info = ExtractorInfo("fake", "<none>", "0")

    def embed_images(self, images):
        from fashionshoot.metrics.images import as_list, to_unit

        return torch.stack([to_unit(i).float().mean(dim=(1, 2)) + 0.1 for i in as_list(images)])

    def embed_texts(self, texts):
        return torch.stack([torch.tensor([1.0, float(len(t)), 0.5]) for t in texts])


@pytest.fixture()
def manifest_run(tmp_path):
    """Generated x1..x3 with references, catalogue garments g1, g2, and a manifest written per test."""
    _write(tmp_path / "gen", ["x1", "x2", "x3"], seed=1, size=(32, 32))
    _write(tmp_path / "gt", ["x1", "x2", "x3"], seed=2, size=(32, 32))
    _write(tmp_path / "garments", ["g1", "g2"], seed=3, size=(24, 40))

    def run(rows: str, metrics: list[str], extractors: Extractors, **overrides):
        manifest = tmp_path / "m.csv"
        manifest.write_text(rows)
        cfg = _cfg(tmp_path, tmp_path / "gen", tmp_path / "gt", metrics=metrics, manifest=str(manifest),
                   garments=[str(tmp_path / "garments")], **overrides)
        return gen_eval.run(cfg, extractors)

    return run


@pytest.mark.parametrize("batch_size", [1, 16])
def test_manifest_row_with_unknown_garment_is_an_error_or_skipped(manifest_run, batch_size):
    rows = "generated,reference,garment\nx1,x1,g1\nx2,x2,g2\nx3,x3,g_missing\n"
    extractors = Extractors(clip=_FakeClip())
    with pytest.raises(DataError, match=r"m\.csv:4 \(garment 'g_missing'"):
        manifest_run(rows, ["clip_i", "psnr"], extractors, batch_size=batch_size)
    report = manifest_run(rows, ["clip_i", "psnr"], extractors, batch_size=batch_size, skip_bad=True)
    assert report.faults["counts"] == {"manifest garment not found in garments": 1}
    assert report.get("clip_i").n == 2 and report.get("psnr").n == 2  # the row is skipped, not half-kept


def test_garment_recall_rows_are_checked_against_the_gallery(manifest_run):
    from fashionshoot.metrics.suite import GarmentGallery

    clip = _FakeClip()
    extractors = Extractors(garment_gallery=GarmentGallery(clip.embed_images, torch.rand(2, 3), ["g1", "g2"]))
    rows = "generated,garment\nx1,g1\nx2,g2\nx3,g_missing\n"
    with pytest.raises(DataError, match=r"m\.csv:4 \(garment 'g_missing'\): manifest garment not in the garment"):
        manifest_run(rows, ["garment_recall"], extractors, setting="unpaired")
    report = manifest_run(rows, ["garment_recall"], extractors, setting="unpaired", skip_bad=True)
    assert report.faults["total"] == 1 and report.get("garment_r@1").n == 2


def test_manifest_row_without_caption_is_not_scored_against_an_empty_caption(manifest_run):
    rows = "generated,caption\nx1,a red dress\nx2,\nx3,blue jeans\n"
    extractors = Extractors(clip=_FakeClip())
    with pytest.raises(DataError, match=r"m\.csv:3 \(generated 'x2'\): manifest row has no caption"):
        manifest_run(rows, ["clip_t"], extractors, setting="unpaired")
    report = manifest_run(rows, ["clip_t"], extractors, setting="unpaired", skip_bad=True)
    assert report.faults["counts"] == {"manifest row has no caption (clip_t needs one)": 1}
    assert report.get("clip_t").n == 2


def test_garment_recall_over_a_catalogue_of_mixed_sizes(tmp_path, tiny_models):
    _write(tmp_path / "garments", ["g1"], seed=3, size=(48, 64))
    _write(tmp_path / "garments", ["g2"], seed=4, size=(60, 80))  # the gallery is embedded in one batch
    _write(tmp_path / "gen", ["x1", "x2"], seed=1, size=(32, 32))
    (tmp_path / "m.csv").write_text("generated,garment\nx1,g1\nx2,g2\n")
    cfg = _cfg(tmp_path, tmp_path / "gen", tmp_path / "gt", metrics=["garment_recall"], setting="unpaired",
               references=[], manifest=str(tmp_path / "m.csv"), garments=[str(tmp_path / "garments")])
    cfg.weights.clip = str(tiny_models["clip"])
    report = gen_eval.run(cfg)
    assert report.get("garment_r@1").n == 2 and report.get("garment_r@5").value == 1.0
