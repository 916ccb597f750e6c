"""Time each fashionshoot metric against the reference implementation on identical inputs (CPU).

    python benchmarks/metrics.py [--repeats 3]

Random / tiny extractors stand in for the pretrained ones (the same module goes to both sides), so
the figures measure the metric code, not a backbone. Each row: best-of-N seconds for update + compute,
the ratio ours / reference, and whether the values agree to 1e-4 relative.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def best_of(fns: tuple[Callable[[], float], Callable[[], float]], repeats: int) -> list[tuple[float, float]]:
    """Best-of-N time and value of each function, alternating them so load drift hits both alike."""
    times: list[list[float]] = [[], []]
    values = [0.0, 0.0]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            values[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(min(t), v) for t, v in zip(times, values, strict=True)]


class RandomFeatures(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                 nn.Linear(128, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net[0].weight.dtype) / 255)


def cases(tmp: Path):
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchmetrics.retrieval import RetrievalHitRate

    import fashionshoot.metrics as fm
    from fashionshoot.metrics.protocol import FASHION_RAG, FASHIONSHOOT

    g = torch.Generator().manual_seed(0)
    real = torch.rand(512, 3, 64, 64, generator=g)
    fake = (real.flip(-1) * 0.8 + 0.2 * torch.rand(512, 3, 64, 64, generator=g)).clamp(0, 1)
    net = RandomFeatures(256).eval()
    p = FASHIONSHOOT.replace(feature_resize="none", kid_subset_size=256, kid_subsets=50)

    def run_pair(metric, kind):
        metric.reset()
        with torch.no_grad():
            # A custom torchmetrics extractor gets [0, 255] from the caller; ours takes [0, 1] and scales inside.
            metric.update(real if kind == "ours" else real * 255, real=True)
            metric.update(fake if kind == "ours" else fake * 255, real=False)
        out = metric.compute()
        return float(out[0] if isinstance(out, tuple) else out)

    fid_ours, fid_ref = fm.FID(net, p), FrechetInceptionDistance(feature=net, normalize=True,
                                                                 input_img_size=(3, 64, 64))
    yield "FID (256-d, 512+512)", lambda: run_pair(fid_ours, "ours"), lambda: run_pair(fid_ref, "ref")
    # Subsets of all 512 samples make KID independent of the (unseeded) torchmetrics sampling; float64
    # features keep torchmetrics' own sums exact enough to compare at 1e-4.
    net64 = RandomFeatures(256).double().eval()
    kid_ours = fm.KID(net64, p.replace(kid_subset_size=512, kid_subsets=20))
    kid_ref = KernelInceptionDistance(feature=net64, subsets=20, subset_size=512)
    yield "KID (256-d, 20 subsets x 512)", lambda: run_pair(kid_ours, "ours"), lambda: run_pair(kid_ref, "ref")

    imgs_a, imgs_b = real[:64], fake[:64]

    def paired(metric, a=imgs_a, b=imgs_b):
        metric.reset()
        with torch.no_grad():
            metric.update(a, b)
        return float(metric.compute())

    ssim_ours, ssim_ref = fm.SSIM(FASHION_RAG), StructuralSimilarityIndexMeasure(data_range=1.0)
    yield "SSIM (64 x 64x64, full border)", lambda: paired(ssim_ours), lambda: paired(ssim_ref)
    psnr_ours = fm.PSNR()
    psnr_ref = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3), reduction="elementwise_mean")
    yield ("PSNR (512 x 64x64, per image)", lambda: paired(psnr_ours, real, fake),
           lambda: paired(psnr_ref, real, fake))

    import lpips
    import torchvision
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    ckpt = tmp / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.alexnet().state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    os.environ["TORCH_HOME"] = str(tmp)
    ours_lpips = fm.LPIPS(fm.load_lpips("alex"))
    ref_lpips = lpips.LPIPS(net="alex", verbose=False)
    tm_lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)

    def lpips_ref():
        with torch.no_grad():
            return float(ref_lpips(imgs_a, imgs_b, normalize=True).mean())

    yield "LPIPS-alex vs lpips (64 x 64x64)", lambda: paired(ours_lpips), lpips_ref
    yield "LPIPS-alex vs torchmetrics", lambda: paired(ours_lpips), lambda: paired(tm_lpips)

    from torchmetrics.multimodal.clip_score import CLIPScore

    from fashionshoot.testing import save_tiny_clip

    clip = fm.HFClip(save_tiny_clip(tmp / "clip"))

    class Tensors(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.config = clip.model, clip.model.config

        def get_image_features(self, *a):
            return self.model.get_image_features(*a).pooler_output

        def get_text_features(self, *a):
            return self.model.get_text_features(*a).pooler_output

    captions = [f"a photo of garment number {i}" for i in range(64)]

    clip_ours = fm.CLIPTextScore(clip)
    clip_ref = CLIPScore(model_name_or_path=lambda: (Tensors(), clip.processor))
    yield ("CLIP-T vs torchmetrics CLIPScore (64)", lambda: paired(clip_ours, imgs_a, captions),
           lambda: paired(clip_ref, imgs_a * 255, captions))

    scores = torch.randn(2000, 5000, generator=g)
    labels_q, labels_g = torch.randint(0, 1500, (2000,), generator=g), torch.randint(0, 1500, (5000,), generator=g)
    relevant = fm.relevance_from_labels(labels_q, labels_g)

    def recall_ours():
        return fm.recall_at_k(fm.first_relevant_rank(scores, relevant), (10,))[10]

    def recall_ref():
        m = RetrievalHitRate(top_k=10, empty_target_action="neg")
        m.update(scores.flatten(), relevant.flatten(), torch.arange(2000).repeat_interleave(5000))
        return float(m.compute())

    yield "Recall@10 vs torchmetrics HitRate (2000 x 5000)", recall_ours, recall_ref


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}\n")
    print(f"| {'metric':<48} | ours s | ref s | ratio | equal |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, ours, ref in cases(Path(tmp)):
            (t_ours, v_ours), (t_ref, v_ref) = best_of((ours, ref), args.repeats)
            equal = abs(v_ours - v_ref) <= 1e-4 * max(abs(v_ref), 1e-12)
            print(f"| {name:<48} | {t_ours:7.4f} | {t_ref:7.4f} | {t_ours / t_ref:5.2f} | "
                  f"{'yes' if equal else f'NO ({v_ours:.6g} vs {v_ref:.6g})'} |", flush=True)


if __name__ == "__main__":
    main()
