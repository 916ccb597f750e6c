"""Our metrics equal the reference implementations on real photographs (scikit-image samples with
controlled distortions): SSIM/PSNR vs scikit-image, LPIPS vs the lpips package and torchmetrics with the
same trunk weights, FID/KID vs torchmetrics and clean-fid's formulas with the same features."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from torch import nn

from fashionshoot.metrics import FID, KID, LPIPS, PSNR, SSIM, kid_from_features, load_lpips
from fashionshoot.metrics.images import feature_inputs
from fashionshoot.metrics.protocol import FASHION_RAG, FASHIONSHOOT

REL = 1e-4


def _photos() -> list[np.ndarray]:
    from skimage import data

    return [np.array(Image.fromarray(im).resize((96, 80), Image.BICUBIC))
            for im in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())]


def _distort(img: np.ndarray, kind: int) -> np.ndarray:
    pil = Image.fromarray(img)
    if kind == 0:
        return np.asarray(pil.filter(ImageFilter.GaussianBlur(1.5)))
    if kind == 1:
        buf = io.BytesIO()
        pil.save(buf, "JPEG", quality=15)
        return np.asarray(Image.open(buf).convert("RGB"))
    noise = np.random.default_rng(kind).normal(0, 12, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pairs() -> tuple[torch.Tensor, torch.Tensor, list[np.ndarray], list[np.ndarray]]:
    clean = _photos()
    dist = [_distort(im, i % 3) for i, im in enumerate(clean)]
    as_t = lambda ims: torch.stack([torch.from_numpy(i).permute(2, 0, 1) for i in ims]).float() / 255  # noqa: E731
    return as_t(dist), as_t(clean), dist, clean


def test_ssim_matches_scikit_image(pairs):
    from skimage.metrics import structural_similarity

    preds, target, dist, clean = pairs
    ref = np.mean([
        structural_similarity(d / 255.0, c / 255.0, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                              use_sample_covariance=False, data_range=1.0)
        for d, c in zip(dist, clean, strict=True)
    ])
    metric = SSIM()
    metric.update(preds[:2], target[:2])
    metric.update(preds[2:], target[2:])
    assert float(metric.compute()) == pytest.approx(ref, rel=REL)


def test_ssim_full_border_matches_torchmetrics(pairs):
    from torchmetrics.image import StructuralSimilarityIndexMeasure

    preds, target, *_ = pairs
    tm = StructuralSimilarityIndexMeasure(data_range=1.0)
    tm.update(preds, target)
    metric = SSIM(FASHION_RAG)
    metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(float(tm.compute()), rel=REL)


def test_psnr_is_mean_of_per_image_scikit_image(pairs):
    from skimage.metrics import peak_signal_noise_ratio

    preds, target, *_ = pairs
    ref = np.mean([peak_signal_noise_ratio(t.numpy(), p.numpy(), data_range=1.0) for p, t in zip(preds, target, strict=True)])
    metric = PSNR()
    metric.update(preds, target)
    assert float(metric.compute()) == pytest.approx(ref, rel=REL)


@pytest.mark.parametrize("net, tv_name", [("alex", "alexnet"), ("squeeze", "squeezenet1_1")])
def test_lpips_matches_lpips_package_and_torchmetrics(pairs, tmp_path, monkeypatch, net, tv_name):
    import lpips
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from fashionshoot.metrics.extractors import LPIPS_TRUNK_FILES

    torch.manual_seed(0)
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(getattr(torchvision.models, tv_name)().state_dict(), checkpoints / LPIPS_TRUNK_FILES[net])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # the references read their trunk from the torch hub cache

    preds, target, *_ = pairs
    ours = LPIPS(load_lpips(net), FASHIONSHOOT.replace(lpips_net=net))
    ours.update(preds, target)
    reference = lpips.LPIPS(net=net, verbose=False)(preds, target, normalize=True).mean()
    tm = LearnedPerceptualImagePatchSimilarity(net_type=net, normalize=True)
    tm.update(preds, target)
    assert float(ours.compute()) == pytest.approx(float(reference), rel=REL)
    assert float(ours.compute()) == pytest.approx(float(tm.compute()), rel=REL)
    assert ours.result().protocol["extractor"]["weights_file"] == LPIPS_TRUNK_FILES[net]


class TinyFeatures(nn.Module):
    """A random conv net: the stand-in for Inception (same module handed to every implementation)."""

    def __init__(self, dim: int = 12) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 7, 4), nn.ReLU(), nn.Conv2d(16, 32, 5, 4), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype) / 255)


def _image_sets(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    photos = torch.stack([torch.from_numpy(p).permute(2, 0, 1) for p in _photos()]).float() / 255
    gen = torch.Generator().manual_seed(0)
    real = (photos.repeat(n // 4, 1, 1, 1) + 0.15 * torch.rand(n, 3, 80, 96, generator=gen)).clamp(0, 1)
    fake = (photos.flip(-1).repeat(n // 4, 1, 1, 1) * 0.8 + 0.2 * torch.rand(n, 3, 80, 96, generator=gen)).clamp(0, 1)
    return real, fake


def test_fid_matches_torchmetrics_and_clean_fid_formula():
    from cleanfid.fid import fid_from_feats
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _image_sets()
    protocol = FASHIONSHOOT.replace(feature_resize="torch-bilinear", feature_size=128)
    net = TinyFeatures()
    ours = FID(net, protocol)
    ours.update(real, real=True)
    ours.update(fake, real=False)
    x_real = feature_inputs(real, "torch-bilinear", 128)
    x_fake = feature_inputs(fake, "torch-bilinear", 128)
    tm = FrechetInceptionDistance(feature=net, normalize=True, input_img_size=(3, 128, 128))
    tm.update(x_real, real=True)
    tm.update(x_fake, real=False)
    with torch.no_grad():
        clean = fid_from_feats(net(x_real).double().numpy(), net(x_fake).double().numpy())
    assert float(ours.compute()) == pytest.approx(float(tm.compute()), rel=REL)
    assert float(ours.compute()) == pytest.approx(clean, rel=REL)


def test_kid_matches_torchmetrics_and_clean_fid_formula():
    from cleanfid.fid import kernel_distance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = _image_sets()
    protocol = FASHIONSHOOT.replace(feature_resize="torch-bilinear", feature_size=128, kid_subset_size=40,
                                    kid_subsets=3, kid_scale=1000.0)
    net = TinyFeatures().double()  # float64 features: torchmetrics then sums in float64 too
    ours = KID(net, protocol)
    ours.update(real, real=True)
    ours.update(fake, real=False)
    x_real = feature_inputs(real, "torch-bilinear", 128)
    x_fake = feature_inputs(fake, "torch-bilinear", 128)
    tm = KernelInceptionDistance(feature=net, subsets=3, subset_size=40)  # subset = all: sampling-independent
    tm.update(x_real, real=True)
    tm.update(x_fake, real=False)
    with torch.no_grad():
        clean = kernel_distance(net(x_real).numpy(), net(x_fake).numpy(), num_subsets=1)
    mean, _ = ours.compute()
    assert float(mean) == pytest.approx(float(tm.compute()[0]), rel=REL)
    assert float(mean) == pytest.approx(clean, rel=REL)
    result = ours.result()
    assert result.value == pytest.approx(1000 * float(mean)) and result.scale == 1000.0
    assert result.details["subset_size_used"] == 40


def test_kid_subsets_match_brute_force_on_the_same_seeded_indices():
    gen = torch.Generator().manual_seed(1)
    real, fake = torch.randn(30, 8, generator=gen), torch.randn(25, 8, generator=gen) + 0.3
    mean, std = kid_from_features(real, fake, subsets=4, subset_size=10, seed=7)
    g = torch.Generator().manual_seed(7)
    values = []
    for _ in range(4):
        x = real[torch.randperm(30, generator=g)[:10]].double().numpy()
        y = fake[torch.randperm(25, generator=g)[:10]].double().numpy()
        kxx, kyy, kxy = ((a @ b.T / 8 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        m = 10
        values.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)
    assert float(mean) == pytest.approx(np.mean(values), rel=REL)
    assert float(std) == pytest.approx(np.std(values), rel=REL)
    again = kid_from_features(real, fake, subsets=4, subset_size=10, seed=7)
    assert torch.equal(again[0], mean)  # reproducible


def test_kid_per_subset_path_equals_full_kernel_path(monkeypatch):
    from fashionshoot.metrics import distribution

    gen = torch.Generator().manual_seed(2)
    real, fake = torch.randn(50, 6, generator=gen), torch.randn(40, 6, generator=gen)
    full = kid_from_features(real, fake, subsets=5, subset_size=20, seed=3)
    monkeypatch.setattr(distribution, "FULL_KERNEL_MAX", 0)
    per_subset = kid_from_features(real, fake, subsets=5, subset_size=20, seed=3)
    torch.testing.assert_close(full, per_subset, rtol=1e-6, atol=1e-9)


def test_clean_resize_matches_clean_fid():
    from cleanfid.resize import build_resizer

    img = _photos()[0]
    ref = build_resizer("clean")(img)
    ours = feature_inputs(torch.from_numpy(img).permute(2, 0, 1)[None], "pil-bicubic", 299)[0]
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), ref)


def test_clean_fid_torchscript_wrapper_equals_clean_fid(tmp_path):
    from cleanfid.inception_torchscript import InceptionV3W

    from fashionshoot.metrics import load_inception

    class Fake(nn.Module):  # the TorchScript layout clean-fid relies on: a ``layers`` submodule
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Conv2d(3, 4, 16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                        nn.Linear(4, 2048))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers(x)

    torch.jit.script(Fake()).save(str(tmp_path / "inception-2015-12-05.pt"))
    x = torch.rand(2, 3, 299, 299) * 255
    ours = load_inception("clean-fid", search_dirs=[tmp_path])
    ref = InceptionV3W(str(tmp_path), download=False)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    assert ours.extractor_info.weights_file == "inception-2015-12-05.pt"
