"""Retrieval metrics equal a brute-force reference; garment-fidelity R@k finds known source garments."""

from __future__ import annotations

import pytest
import torch

from fashionshoot.metrics import (
    GarmentRetrievalRecall,
    first_relevant_rank,
    recall_at_k,
    relevance_from_labels,
    retrieval_metrics,
    topk_accuracy,
)


def _brute_force(scores, relevant, ks, detected):
    out = {f"{n}@{k}": 0.0 for k in ks for n in ("recall", "recall_fraction", "precision")}
    out["mAP"] = 0.0
    q_n, g_n = scores.shape
    for q in range(q_n):
        order = sorted(range(g_n), key=lambda g: (-float(scores[q, g]), g))  # stable: ties by gallery index
        rel = [bool(relevant[q, g]) and bool(detected[q]) for g in order]
        n_rel = sum(rel)
        for k in ks:
            found = sum(rel[:k])
            out[f"recall@{k}"] += found > 0
            out[f"recall_fraction@{k}"] += found / n_rel if n_rel else 0
            out[f"precision@{k}"] += found / k
        hits, ap = 0, 0.0
        for i, r in enumerate(rel, start=1):
            if r:
                hits += 1
                ap += hits / i
        out["mAP"] += ap / n_rel if n_rel else 0
    return {k: v / q_n for k, v in out.items()}


@pytest.mark.parametrize("ties", [False, True])
def test_retrieval_metrics_match_brute_force(ties):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(37, 53, generator=gen)
    if ties:
        scores = (scores * 2).round() / 2  # many equal scores
    labels_q = torch.randint(0, 12, (37,), generator=gen)
    labels_g = torch.randint(0, 15, (53,), generator=gen)  # some queries have no relevant item
    relevant = relevance_from_labels(labels_q, labels_g)
    detected = torch.rand(37, generator=gen) > 0.2
    ks = (1, 3, 5, 10, 60)
    ours = retrieval_metrics(scores, relevant, ks, detected)
    ref = _brute_force(scores, relevant, ks, detected)
    assert ours.keys() == ref.keys()
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-12), key
    ranks = first_relevant_rank(scores, relevant, detected)
    assert recall_at_k(ranks, ks) == pytest.approx({k: ref[f"recall@{k}"] for k in ks}, rel=1e-4)
    assert topk_accuracy(scores, relevant, detected, ks) == pytest.approx(recall_at_k(ranks, ks))


def test_undetected_query_is_a_miss():
    scores = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    relevant = torch.tensor([[True, False], [True, False]])
    assert topk_accuracy(scores, relevant, torch.tensor([True, False]), ks=(1,)) == {1: 0.5}


def _colour_encoder(images: torch.Tensor) -> torch.Tensor:
    """A deterministic encoder: the mean colour plus a coarse 2x2 layout of each image."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)
    return torch.cat([images.mean(dim=(2, 3)), pooled], 1) - 0.5


def test_garment_recall_finds_the_source_garment():
    gen = torch.Generator().manual_seed(0)
    garments = torch.rand(20, 3, 16, 16, generator=gen)
    ids = [f"g{i:02d}" for i in range(20)]
    metric = GarmentRetrievalRecall.from_gallery_images(_colour_encoder, garments, ids)
    # Generated images: slightly perturbed copies of garments 0..9 -> every one retrieved at rank 1.
    generated = (garments[:10] + 0.01 * torch.rand(10, 3, 16, 16, generator=gen)).clamp(0, 1)
    metric.update(generated[:5], ids[:5])
    metric.update(generated[5:], ids[5:10])
    assert metric.compute() == {1: 1.0, 5: 1.0, 10: 1.0}
    # Claiming the wrong source garment can only lower recall.
    metric.reset()
    metric.update(generated, ids[10:])
    results = metric.results("dresses")
    assert [r.metric for r in results] == ["garment_r@1", "garment_r@5", "garment_r@10"]
    assert results[0].value < 1.0 and results[0].category == "dresses"
    assert results[0].protocol["extractor"]["name"].startswith("custom:")


def test_pil_encoders_plug_in():
    from torchvision.transforms.functional import pil_to_tensor

    from fashionshoot.metrics import from_pil_encoder

    garments = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    pil_encoder = from_pil_encoder(lambda ims: _colour_encoder(torch.stack([pil_to_tensor(i) / 255 for i in ims])))
    metric = GarmentRetrievalRecall.from_gallery_images(pil_encoder, garments, [str(i) for i in range(6)])
    metric.update(garments, [str(i) for i in range(6)])
    assert metric.compute()[1] == 1.0


def test_garment_recall_takes_images_of_mixed_sizes():
    from fashionshoot.metrics.fidelity import embed

    gen = torch.Generator().manual_seed(1)
    garments = [torch.rand(3, 16, 12, generator=gen), torch.rand(3, 20, 16, generator=gen),
                torch.rand(3, 20, 16, generator=gen), torch.rand(3, 16, 12, generator=gen)]
    ids = ["a", "b", "c", "d"]
    calls = []

    def encoder(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        return _colour_encoder(batch)

    gallery = embed(encoder, garments, batch_size=64)
    assert calls == [1, 2, 1]  # equal-size neighbours stacked, order kept
    one_by_one = torch.cat([embed(_colour_encoder, [g]) for g in garments])
    torch.testing.assert_close(gallery, one_by_one)
    metric = GarmentRetrievalRecall.from_gallery_images(_colour_encoder, garments, ids)
    metric.update(garments, ids)  # queries of mixed sizes in one update
    assert metric.compute()[1] == 1.0
