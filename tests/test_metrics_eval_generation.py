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
