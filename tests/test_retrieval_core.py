"""Encoders, exact chunked top-k search and score fusion."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from fashionshoot.errors import DataError
from fashionshoot.retrieval.encoders import Encoder, OpenClipEncoder, TransformersEncoder
from fashionshoot.retrieval.fusion import dot_mean_std, fuse_scores, gallery_moments, linear_fusion, ranks
from fashionshoot.retrieval.index import ExactIndex


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_exact_index_equals_brute_force(chunk_size):
    gallery, queries = _unit(300, 16, 0), _unit(25, 16, 1)
    index = ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=torch.float32)
    result = index.search(queries, k=10, query_chunk=8)
    expected_scores, expected_idx = (queries @ gallery.T).topk(10, dim=1)
    assert torch.equal(result.indices, expected_idx)
    torch.testing.assert_close(result.scores, expected_scores)


def test_fp16_storage_keeps_the_ranking_of_well_separated_items():
    gallery = _unit(200, 32, 2)
    queries = gallery[:50] + 0.01 * _unit(50, 32, 3)
    index = ExactIndex(gallery, chunk_size=33, storage_dtype=torch.float16)
    assert index.embeddings.dtype == torch.float16 and ExactIndex(gallery).embeddings.dtype == torch.float32
    result = index.search(queries, k=1)
    assert torch.equal(result.indices[:, 0], torch.arange(50))


@pytest.mark.parametrize(("size", "chunk_size", "group", "k"), [(5000, 512, 4, 5), (4099, 1000, 8, 1), (3000, 700, 3, 7)])
def test_thresholded_scan_equals_brute_force(size, chunk_size, group, k):
    # Chunks much larger than k * group take the grouped, thresholded path after the first chunk;
    # sizes not divisible by the chunk or the group exercise the ragged tails.
    gallery, queries = _unit(size, 16, 6), _unit(40, 16, 7)
    for storage in (torch.float32, torch.float16):
        index = ExactIndex(gallery, chunk_size=chunk_size, storage_dtype=storage, group=group)
        result = index.search(queries, k=k, query_chunk=16)
        expected_scores, expected_idx = (queries @ index.embeddings.float().T).topk(k, dim=1)
        assert torch.equal(result.indices, expected_idx)
        torch.testing.assert_close(result.scores, expected_scores)


def test_exact_index_agrees_with_faiss():
    pytest.importorskip("faiss")
    from fashionshoot.retrieval.index import FaissIndex

    gallery, queries = _unit(20000, 32, 8), _unit(64, 32, 9)
    exact = ExactIndex(gallery, chunk_size=2048).search(queries, k=10)
    flat = FaissIndex(gallery)
    assert len(flat) == 20000 and flat.dim == 32
    reference = flat.search(queries, k=10)
    assert torch.equal(exact.indices, reference.indices.long())
    torch.testing.assert_close(exact.scores, reference.scores, atol=1e-5, rtol=1e-5)


def test_multi_part_index_searches_the_side_by_side_gallery():
    parts = [_unit(3000, 8, 10), _unit(3000, 16, 11).half(), _unit(3000, 4, 12)]
    queries = _unit(20, 28, 13)
    whole = torch.cat([p.float() for p in parts], dim=1)
    for storage in (torch.float32, torch.float16):
        index = ExactIndex(parts, chunk_size=700, storage_dtype=storage, group=4)
        assert index.dim == 28 and len(index) == 3000 and torch.equal(index.embeddings, whole.to(storage))
        expected = (queries @ whole.to(storage).float().T).topk(6, dim=1)
        result = index.search(queries, k=6, query_chunk=8)
        assert torch.equal(result.indices, expected.indices)
        torch.testing.assert_close(result.scores, expected.values)
    with pytest.raises(DataError, match="different numbers of rows"):
        ExactIndex([_unit(5, 4, 0), _unit(6, 4, 1)])


def test_linear_fusion_equals_fusing_dot_product_scores():
    gen = torch.Generator().manual_seed(14)
    centre = 3.0 * torch.randn(12, generator=gen)
    gallery = {"a": torch.nn.functional.normalize(centre + torch.randn(2000, 12, generator=gen), dim=1),
               "b": _unit(2000, 20, 15).half()}
    queries = {"a": torch.nn.functional.normalize(centre + torch.randn(9, 12, generator=gen), dim=1),
               "b": _unit(9, 20, 16)}
    moments = {n: gallery_moments(g, chunk_rows=300) for n, g in gallery.items()}
    scores = {n: queries[n] @ gallery[n].float().T for n in gallery}
    mean, std = dot_mean_std(queries["a"], moments["a"])
    torch.testing.assert_close(mean, scores["a"].mean(1, keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(std, scores["a"].double().std(1, correction=0, keepdim=True).float(), atol=1e-7, rtol=1e-5)
    fused = {}
    for method in ("zscore", "weighted"):
        scaled, shift = linear_fusion(queries, moments, method, {"b": 3.0})
        fused[method] = sum(scaled[n] @ gallery[n].float().T for n in gallery) + shift
        torch.testing.assert_close(fused[method], fuse_scores(scores, method, {"b": 3.0}), atol=1e-5, rtol=1e-5)
    # Scores far from zero (mean ~0.9, std ~0.03): both match the float64 z-scores.
    z = {n: (s.double() - s.double().mean(1, keepdim=True)) / s.double().std(1, correction=0, keepdim=True)
         for n, s in scores.items()}
    truth = (z["a"] + 3 * z["b"]) / 4
    torch.testing.assert_close(fuse_scores(scores, "zscore", {"b": 3.0}).double(), truth, atol=1e-5, rtol=0)
    torch.testing.assert_close(fused["zscore"].double(), truth, atol=1e-5, rtol=0)
    with pytest.raises(DataError, match="not linear"):
        linear_fusion(queries, moments, "rrf")
    with pytest.raises(DataError, match="no gallery moments"):
        linear_fusion(queries, None, "zscore")


def test_k_larger_than_gallery_is_capped_and_dims_are_checked(tmp_path):
    index = ExactIndex(_unit(5, 8, 4), chunk_size=2)
    assert index.search(_unit(3, 8, 5), k=50).indices.shape == (3, 5)
    with pytest.raises(DataError, match=r"shape \(N, 8\)"):
        index.search(_unit(3, 9, 5), k=2)
    with pytest.raises(DataError, match="non-empty"):
        ExactIndex(torch.empty(0, 8))
    path = index.save(tmp_path / "gallery.safetensors")
    reloaded = ExactIndex.load(path)
    assert reloaded.chunk_size == 2 and torch.equal(reloaded.embeddings, index.embeddings)


def test_zscore_and_minmax_fusion_ignore_each_members_scale():
    a = torch.randn(4, 30, generator=torch.Generator().manual_seed(0))
    b = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    for method in ("zscore", "minmax", "rrf"):
        base = fuse_scores({"a": a, "b": b}, method)
        rescaled = fuse_scores({"a": 100 * a - 3, "b": 0.01 * b + 7}, method)
        torch.testing.assert_close(base, rescaled, rtol=1e-3, atol=1e-4)
    raw = fuse_scores({"a": 100 * a, "b": b}, "weighted")
    assert torch.equal(raw.argmax(1), a.argmax(1)), "unnormalised fusion is dominated by the larger scale"


def test_rrf_matches_the_formula_and_weights_shift_the_result():
    a = torch.tensor([[0.9, 0.5, 0.1]])
    b = torch.tensor([[0.1, 0.2, 0.3]])
    assert ranks(a).tolist() == [[1, 2, 3]] and ranks(b).tolist() == [[3, 2, 1]]
    fused = fuse_scores({"a": a, "b": b}, "rrf", rrf_k=60)
    expected = torch.tensor([[1 / 61 + 1 / 63, 2 / 62, 1 / 63 + 1 / 61]]) / 2
    torch.testing.assert_close(fused, expected)
    assert fuse_scores({"a": a, "b": b}, "zscore", weights={"a": 3.0}).argmax().item() == 0
    assert fuse_scores({"a": a, "b": b}, "zscore", weights={"b": 3.0}).argmax().item() == 2


def test_fusion_rejects_mismatched_members():
    with pytest.raises(DataError, match="same"):
        fuse_scores({"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(DataError, match="unknown member"):
        fuse_scores({"a": torch.zeros(2, 3)}, weights={"c": 1.0})
    with pytest.raises(DataError, match="no member"):
        fuse_scores({})


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40 + 3 * i, 30), (40 * i, 255 - 30 * i, 90)) for i in range(5)]


@pytest.mark.parametrize("backend", ["siglip2", "clip", "open_clip"])
def test_encoders_give_unit_vectors_independent_of_batching(tiny_models, backend):
    if backend == "open_clip":
        make = lambda bs: OpenClipEncoder(tiny_models[backend], batch_size=bs)  # noqa: E731
    else:
        make = lambda bs: TransformersEncoder(tiny_models[backend], batch_size=bs)  # noqa: E731
    one, many = make(1), make(64)
    assert isinstance(one, Encoder)
    images, texts = _images(), ["a red dress", "navy striped top", "black trousers"]
    emb = many.embed_images(images)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(one.embed_images(images), emb, atol=1e-5, rtol=1e-4)
    text = many.embed_texts(texts)
    torch.testing.assert_close(one.embed_texts(texts), text, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(text[0], text[1])
