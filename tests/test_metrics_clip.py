"""CLIP-T equals torchmetrics' CLIPScore with the same model; CLIP-I is the mean image-image cosine;
OpenCLIP folders load through the same backend protocol."""

from __future__ import annotations

import pytest
import torch

from fashionshoot.metrics import CLIPImageScore, CLIPTextScore, HFClip, OpenClip, load_clip
from fashionshoot.metrics.clip import cosine

CAPTIONS = ["a red silk dress", "blue denim jeans", "a white cotton shirt", "black leather jacket"]


def _images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 40, 36, generator=torch.Generator().manual_seed(seed))


class _TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects tensors from ``get_*_features``; transformers 5 returns model outputs."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args):
        return self.model.get_image_features(*args).pooler_output

    def get_text_features(self, *args):
        return self.model.get_text_features(*args).pooler_output


def test_clip_t_equals_torchmetrics_clipscore(tiny_models):
    from torchmetrics.multimodal.clip_score import CLIPScore

    clip = HFClip(tiny_models["clip"])
    images = _images()
    ours = CLIPTextScore(clip)
    ours.update(images[:2], CAPTIONS[:2])
    ours.update(images[2:], CAPTIONS[2:])
    reference = CLIPScore(model_name_or_path=lambda: (_TensorFeatures(clip.model), clip.processor))
    reference.update(images * 255, CAPTIONS)  # torchmetrics hands the processor [0, 255] images
    assert float(ours.compute()) == pytest.approx(float(reference.compute()), rel=1e-4)
    result = ours.result()
    assert result.scale == 100.0 and result.value == pytest.approx(float(ours.compute()), rel=1e-6)
    assert result.protocol["extractor"]["weights_hash"]


def test_clip_i_is_mean_cosine_over_references(tiny_models):
    clip = load_clip(tiny_models["clip"])
    generated, garments = _images(2, 1), _images(3, 2)
    metric = CLIPImageScore(clip)
    metric.update(generated, [garments[0], garments[1:]])  # one garment, then two retrieved garments
    g, r = clip.embed_images(generated), clip.embed_images(garments)
    expected = (cosine(g[:1], r[:1]).item() + cosine(g[1:].expand(2, -1), r[1:]).mean().item()) / 2
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-4)
    same = CLIPImageScore(clip)
    same.update(generated, generated)
    assert float(same.compute()) == pytest.approx(1.0, rel=1e-5)


def test_open_clip_backend(tiny_models):
    clip = load_clip(tiny_models["open_clip"])
    assert isinstance(clip, OpenClip)
    metric = CLIPTextScore(clip)
    metric.update(_images(2), CAPTIONS[:2])
    assert 0.0 <= float(metric.compute()) <= 100.0
    assert clip.embed_texts(CAPTIONS).shape[0] == 4
