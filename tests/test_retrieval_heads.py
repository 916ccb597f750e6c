"""Metric heads, Poincaré-ball operations, the head encoder and the retrieval ensemble (fast, CPU)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from fashionshoot.config import load_config, to_dict
from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval import hyperbolic
from fashionshoot.retrieval.ensemble import EnsembleConfig, RetrievalEnsemble, chunked_topk
from fashionshoot.retrieval.fusion import fuse_scores
from fashionshoot.retrieval.heads import (
    HeadConfig,
    HyperbolicHead,
    MetricHead,
    ProxyNCAHead,
    build_head,
    proxy_nca_loss,
    supervised_contrastive_loss,
)
from fashionshoot.retrieval.members import BackboneFeatures, HeadEncoder, MemberConfig

REPO = Path(__file__).resolve().parents[1]


def _ball_points(n: int, dim: int = 8, c: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return hyperbolic.expmap0(0.5 * torch.randn(n, dim, generator=g), c)


# --------------------------------------------------------------------------------------------------
# Poincaré ball
# --------------------------------------------------------------------------------------------------


def test_poincare_distance_matches_the_arcosh_closed_form() -> None:
    c = 0.5
    x, y = _ball_points(5, c=c, seed=1), _ball_points(7, c=c, seed=2)
    sq = torch.cdist(x.double(), y.double()) ** 2
    denom = (1 - c * (x.double() ** 2).sum(-1, keepdim=True)) * (1 - c * (y.double() ** 2).sum(-1))
    expected = torch.acosh(1 + 2 * c * sq / denom) / math.sqrt(c)
    assert torch.allclose(hyperbolic.poincare_distance(x, y, c).double(), expected, atol=1e-4)


def test_poincare_distance_is_a_metric_on_samples_and_has_finite_gradients_at_zero() -> None:
    x = _ball_points(6).requires_grad_(True)
    d = hyperbolic.poincare_distance(x, x, 0.5)
    assert torch.allclose(d, d.T, atol=1e-4)
    assert d.diagonal().abs().max() < 1e-2
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_poincare_distance_keeps_its_ranking_near_the_boundary() -> None:
    # clip_r=None at c=1 puts points within 1e-5 of the boundary; float32 cancellation used to cap
    # every distance (d(x, x) = 12.2), so a hyperbolic member ranked at random.
    c = 1.0
    gen = torch.Generator().manual_seed(0)
    gallery = hyperbolic.to_ball(torch.randn(100, 32, generator=gen), c)
    queries = hyperbolic.to_ball(torch.randn(10, 32, generator=gen), c)
    d = hyperbolic.poincare_distance(queries, gallery, c)
    sq = torch.cdist(queries.double(), gallery.double()) ** 2
    denom = (1 - c * (queries.double() ** 2).sum(-1, keepdim=True)) * (1 - c * (gallery.double() ** 2).sum(-1))
    expected = torch.acosh(1 + 2 * c * sq / denom) / math.sqrt(c)
    assert torch.equal(d.argmin(1), expected.argmin(1))
    assert (d.double() - expected).abs().max() < 1e-2
    assert hyperbolic.poincare_distance(gallery[:5], gallery[:5], c).diagonal().max() < 1e-2


def test_expmap_stays_inside_the_ball_and_clipping_bounds_the_norm() -> None:
    c = 1.0
    huge = torch.randn(10, 4) * 1e4
    assert (hyperbolic.expmap0(huge, c).norm(dim=-1) < 1 / math.sqrt(c)).all()
    clipped = hyperbolic.clip_features(huge, 2.3)
    assert torch.allclose(clipped.norm(dim=-1), torch.full((10,), 2.3))
    small = torch.randn(3, 4) * 0.01
    assert torch.equal(hyperbolic.clip_features(small, 2.3), small)
    assert torch.equal(hyperbolic.clip_features(huge, None), huge)


# --------------------------------------------------------------------------------------------------
# Losses and heads
# --------------------------------------------------------------------------------------------------


def test_proxy_nca_loss_is_low_at_the_own_proxy_and_sharpened_by_low_temperature() -> None:
    proxies = torch.eye(4)
    labels = torch.arange(4)
    at_proxy = proxy_nca_loss(proxies.clone(), proxies, labels, 1 / 9)
    wrong = proxy_nca_loss(proxies.roll(1, 0), proxies, labels, 1 / 9)
    assert at_proxy < 0.01 < 5 < wrong
    assert proxy_nca_loss(proxies, proxies, labels, 1.0) > at_proxy


def test_supervised_contrastive_loss_equals_nt_xent_with_two_views() -> None:
    z = F.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    sim, t = z @ z.T, 0.2
    logits = (sim / t).masked_fill(torch.eye(6, dtype=torch.bool), float("-inf"))
    expected = F.cross_entropy(logits, torch.tensor([3, 4, 5, 0, 1, 2]))
    assert torch.allclose(supervised_contrastive_loss(sim, labels, t), expected)
    # A singleton class (no positive) is ignored, not a NaN.
    loss = supervised_contrastive_loss(sim[:5, :5], labels[:5], t)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="no anchor"):
        supervised_contrastive_loss(sim[:3, :3], labels[:3], t)


def test_heads_geometry_and_fast_moving_proxies() -> None:
    features = torch.randn(8, 16)
    proxy = build_head(HeadConfig(kind="proxynca", in_dim=16, embed_dim=4, num_classes=3))
    hyp = build_head(HeadConfig(kind="hyperbolic", in_dim=16, embed_dim=4, hidden_dim=0, curvature=0.5))
    assert isinstance(proxy, ProxyNCAHead) and isinstance(hyp, HyperbolicHead)
    assert torch.allclose(proxy(features).norm(dim=-1), torch.ones(8), atol=1e-5)
    assert (hyp(features).norm(dim=-1) < 1 / math.sqrt(0.5)).all()
    assert proxy.temperature == pytest.approx(1 / 9) and hyp.temperature == pytest.approx(0.2)
    groups = proxy.param_groups(1e-3, proxy_lr_mult=100)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(0.1)] and groups[1]["params"] == [proxy.proxies]
    emb = hyp(features)
    assert torch.allclose(hyp.similarity(emb, emb), -hyperbolic.poincare_distance(emb, emb, 0.5))
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    for head in (proxy, hyp):
        loss = head.loss(head(features), labels)
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["proxynca", "hyperbolic"])
def test_head_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    head = build_head(HeadConfig(kind=kind, in_dim=12, embed_dim=6, num_classes=4, backbone={"path": "/x"}))
    head.save_pretrained(tmp_path / kind)
    loaded = MetricHead.from_pretrained(tmp_path / kind)
    assert type(loaded) is type(head) and loaded.config == head.config and not loaded.training
    x = torch.randn(3, 12)
    head.eval()
    assert torch.allclose(loaded(x), head(x))


def test_head_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind"):
        HeadConfig(kind="euclid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="in_dim"):
        build_head(HeadConfig(kind="proxynca"))
    with pytest.raises(ConfigError, match="not a metric head folder"):
        MetricHead.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="num_classes"):
        head = build_head(HeadConfig(kind="proxynca", in_dim=4))
        head.loss(head(torch.randn(2, 4)), torch.tensor([0, 0]))


def test_heads_module_does_not_import_transformers() -> None:
    code = ("import sys, fashionshoot.retrieval.heads, fashionshoot.retrieval.hyperbolic; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------------
# Backbone features and head members on tiny real models
# --------------------------------------------------------------------------------------------------


def _images(n: int) -> list[Image.Image]:
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (120, 60, 160)]
    return [Image.new("RGB", (40 + 4 * i, 48), colours[i % len(colours)]) for i in range(n)]


@pytest.mark.parametrize("backend", ["siglip2", "clip", "open_clip"])
def test_token_features_and_head_encoder(tiny_models: dict[str, Path], backend: str) -> None:
    from fashionshoot.retrieval.members import build_backbone

    encoder = build_backbone(backend, str(tiny_models[backend]))
    tokens = BackboneFeatures(encoder, "tokens")(_images(3))
    plain = BackboneFeatures(encoder, "embedding")(_images(3))
    assert tokens.shape[0] == 3 and tokens.shape[1] > plain.shape[1] and torch.isfinite(tokens).all()
    head = build_head(HeadConfig(kind="hyperbolic", in_dim=tokens.shape[1], embed_dim=8))
    member = HeadEncoder(BackboneFeatures(encoder, "tokens"), head, name="hyp")
    emb = member.embed_images(_images(3))
    assert emb.shape == (3, 8) and member.metric == "poincare"
    assert torch.allclose(member.similarity(emb, emb).diagonal(), torch.zeros(3), atol=1e-2)
    with pytest.raises(DataError, match="images only"):
        member.embed_texts(["a red dress"])
    with pytest.raises(DataError, match="backbone features"):
        member.embed_features(plain)


def test_token_features_need_a_model_backbone() -> None:
    from fashionshoot.retrieval.encoders import HistogramEncoder

    with pytest.raises(ConfigError, match="tokens"):
        BackboneFeatures(HistogramEncoder(), "tokens")


# --------------------------------------------------------------------------------------------------
# The ensemble
# --------------------------------------------------------------------------------------------------


class _Precomputed:
    """A member whose embeddings are given; ``poincare`` members rank by negative distance."""

    def __init__(self, name: str, poincare: bool = False) -> None:
        self.name = name
        if poincare:
            self.similarity = lambda q, g: -hyperbolic.poincare_distance(q, g, 1.0)

    def embed_images(self, images):  # pragma: no cover - the tests pass embeddings
        raise AssertionError("embeddings are precomputed")


def _embedded(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 8, generator=g)
    return {"cos": F.normalize(base + 0.3 * torch.randn(n, 8, generator=g), dim=-1),
            "hyp": hyperbolic.expmap0(base + 0.3 * torch.randn(n, 8, generator=g), 1.0)}


def _ensemble(fusion: str = "zscore", **kw) -> RetrievalEnsemble:
    return RetrievalEnsemble({"cos": _Precomputed("cos"), "hyp": _Precomputed("hyp", poincare=True)},
                             fusion=fusion, weights={"cos": 2.0, "hyp": 1.0}, **kw)


def test_score_returns_members_and_fusion() -> None:
    ensemble = _ensemble()
    q, g = _embedded(4, 0), _embedded(30, 1)
    scores = ensemble.score(q, g)
    assert set(scores) == {"cos", "hyp", "fused"} and all(s.shape == (4, 30) for s in scores.values())
    assert torch.allclose(scores["cos"], q["cos"] @ g["cos"].T)
    assert torch.allclose(scores["hyp"], -hyperbolic.poincare_distance(q["hyp"], g["hyp"], 1.0))
    expected = fuse_scores({"cos": scores["cos"], "hyp": scores["hyp"]}, "zscore", {"cos": 2.0, "hyp": 1.0})
    torch.testing.assert_close(scores["fused"], expected, atol=1e-5, rtol=1e-5)  # cos statistics are analytic
    with pytest.raises(DataError, match="lack member"):
        ensemble.score({"cos": q["cos"]}, g)


def test_exact_search_is_the_top_of_the_fused_scores() -> None:
    ensemble = _ensemble(shortlist=0)
    q, g = _embedded(9, 2), _embedded(50, 3)
    fused = ensemble.score(q, g)["fused"]
    result = ensemble.search(q, g, k=5, block_elements=100)  # several query blocks
    top = fused.topk(5, dim=1)
    assert torch.equal(result.indices, top.indices) and torch.allclose(result.scores, top.values, atol=1e-3)
    assert ensemble.search(q, g, k=500).indices.shape == (9, 50)


def test_shortlist_search_rescoring_recovers_the_exact_ranking() -> None:
    # Weighted fusion does not depend on which candidates are scored, so re-ranking the union of
    # per-member shortlists must find the exact top-k whenever the shortlists contain it.
    ensemble = _ensemble("weighted", shortlist=40)
    q, g = _embedded(6, 4), _embedded(400, 5)
    exact = ensemble.search(q, g, k=5, shortlist=0)
    short = ensemble.search(q, g, k=5)
    assert torch.equal(short.indices, exact.indices)
    assert torch.allclose(short.scores, exact.scores, atol=1e-3)
    # zscore fusion normalises over the candidate union: still a ranking of real gallery rows.
    z = _ensemble(shortlist=40).search(q, g, k=5)
    assert z.indices.shape == (6, 5) and (z.indices >= 0).all() and (z.indices < 400).all()


def test_shortlist_search_fills_k_results_when_k_exceeds_the_shortlist() -> None:
    # Two shortlists of 8 hold at most 16 rows: k=20 used to come back padded with -1 / -inf.
    q, g = _embedded(5, 8), _embedded(400, 9)
    result = _ensemble("minmax", shortlist=8).search(q, g, k=20)
    assert result.indices.shape == (5, 20) and (result.indices >= 0).all()
    assert torch.isfinite(result.scores).all()
    assert all(len(set(row)) == 20 for row in result.indices.tolist())


@pytest.mark.parametrize("fusion", ["zscore", "minmax", "weighted", "rrf"])
def test_tiled_scoring_equals_fusing_the_member_scores(fusion: str) -> None:
    # Tiles smaller than a row and several query blocks: every tile and block boundary is crossed.
    ensemble = _ensemble(fusion)
    q, g = _embedded(7, 6), _embedded(1000, 7)
    scores = ensemble._score(q, g, ["cos", "hyp"], ensemble.weights, tile_bytes=4 * 3 * 300, query_block=3)
    torch.testing.assert_close(scores["cos"], q["cos"] @ g["cos"].T)  # row blocks round like a full mm
    expected = fuse_scores({"cos": scores["cos"], "hyp": scores["hyp"]}, fusion, {"cos": 2.0, "hyp": 1.0})
    torch.testing.assert_close(scores["fused"], expected, atol=1e-5, rtol=1e-5)


def _cosine_ensemble(fusion: str, dims: tuple[int, ...] = (16, 24, 8)) -> tuple[RetrievalEnsemble, dict, dict]:
    """All-dot-product members (the fast path), with gallery means far from zero (hard for variances)."""
    gen = torch.Generator().manual_seed(11)
    names = [f"m{i}" for i in range(len(dims))]
    ensemble = RetrievalEnsemble({n: _Precomputed(n) for n in names}, fusion=fusion, weights={"m0": 2.0, "m2": 0.5})
    q, g = {}, {}
    for n, d in zip(names, dims, strict=True):
        centre = 2.0 * torch.randn(d, generator=gen)
        g[n] = F.normalize(centre + torch.randn(9000, d, generator=gen), dim=-1)
        q[n] = F.normalize(centre + torch.randn(13, d, generator=gen), dim=-1)
    return ensemble, q, g


@pytest.mark.parametrize("fusion", ["zscore", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dot_product_fast_path_equals_the_generic_fusion(fusion: str, dtype: torch.dtype) -> None:
    ensemble, q, g = _cosine_ensemble(fusion)
    g = {n: e.to(dtype) for n, e in g.items()}
    member = {n: q[n] @ g[n].float().T for n in q}
    expected = fuse_scores(member, fusion, ensemble.weights)
    scores = ensemble.score(q, g)  # 13 queries < D: statistics from a pass (no moments cached yet)
    torch.testing.assert_close(scores["fused"], expected, atol=1e-5, rtol=1e-5)
    assert ensemble.prepare(g) is g
    scores = ensemble.score(q, g)  # analytic statistics
    assert all(torch.equal(scores[n], member[n]) for n in q)
    torch.testing.assert_close(scores["fused"], expected, atol=1e-5, rtol=1e-5)
    # float64 truth: the analytic statistics are closer to it than the sum-of-squares pass.
    if fusion == "zscore":
        def z(s: torch.Tensor) -> torch.Tensor:
            return (s - s.mean(1, keepdim=True)) / s.std(1, correction=0, keepdim=True)

        truth = sum(w * z(q[n].double() @ g[n].double().T) for n, w in (("m0", 2.0), ("m1", 1.0), ("m2", 0.5))) / 3.5
        torch.testing.assert_close(scores["fused"].double(), truth, atol=1e-5, rtol=0)
    # Search: one chunked ExactIndex scan over the side-by-side galleries (9000 rows: 3 chunks) finds
    # the top of the dense fused scores, whatever the shortlist setting.
    top = expected.topk(10, dim=1)
    for shortlist in (0, 50):
        result = ensemble.search(q, g, k=10, shortlist=shortlist)
        assert torch.equal(result.indices, top.indices)
        torch.testing.assert_close(result.scores, top.values, atol=5e-5, rtol=1e-5)


def test_gallery_moments_are_cached_per_tensor_and_refreshed_on_change() -> None:
    from fashionshoot.retrieval.ensemble import cached_moments, has_moments

    gallery = F.normalize(torch.randn(500, 6, generator=torch.Generator().manual_seed(3)) + 1.0, dim=-1)
    assert not has_moments(gallery)
    first = cached_moments(gallery)
    assert cached_moments(gallery) is first and has_moments(gallery)
    torch.testing.assert_close(first.cov, torch.cov(gallery.double().T, correction=0))
    torch.testing.assert_close(first.mean, gallery.double().mean(0))
    gallery.mul_(2.0)
    assert not has_moments(gallery) and cached_moments(gallery) is not first
    torch.testing.assert_close(cached_moments(gallery).cov, 4 * first.cov)


def test_chunked_topk_matches_full_topk() -> None:
    g = torch.randn(103, 4)
    q = torch.randn(3, 4)
    result = chunked_topk(lambda chunk: q @ chunk.T, g, k=7, chunk_size=10)
    assert torch.equal(result.indices, (q @ g.T).topk(7, dim=1).indices)


def test_ensemble_from_config_with_saved_heads_shares_the_backbone(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = str(tiny_models["siglip2"])
    from fashionshoot.retrieval.members import build_backbone

    dim = BackboneFeatures(build_backbone("siglip2", path), "tokens")(_images(1)).shape[1]
    for kind in ("proxynca", "hyperbolic"):
        build_head(HeadConfig(kind=kind, in_dim=dim, embed_dim=8, num_classes=2,
                              backbone={"backend": "siglip2", "path": path, "features": "tokens", "layers": 0})
                   ).save_pretrained(tmp_path / kind)
    config = EnsembleConfig(members=[MemberConfig(name="siglip2", backend="siglip2", path=path),
                                     MemberConfig(name="proxy", head=str(tmp_path / "proxynca"), weight=2.0),
                                     MemberConfig(name="hyp", head=str(tmp_path / "hyperbolic"))])
    # The config round-trips through YAML like every other config.
    (tmp_path / "ensemble.yaml").write_text(yaml.safe_dump(to_dict(config)))
    config = load_config(EnsembleConfig, tmp_path / "ensemble.yaml")
    ensemble = RetrievalEnsemble.from_config(config)
    assert ensemble.members["proxy"].features.encoder is ensemble.members["siglip2"]
    assert ensemble.weights == {"siglip2": 1.0, "proxy": 2.0, "hyp": 1.0}
    scores = ensemble.score(_images(2), _images(5))
    assert set(scores) == {"siglip2", "proxy", "hyp", "fused"}
    assert ensemble.search(_images(2), ensemble.embed(_images(5)), k=3).indices.shape == (2, 3)


def test_ensemble_config_errors() -> None:
    with pytest.raises(ConfigError, match="unique"):
        EnsembleConfig(members=[MemberConfig(name="a"), MemberConfig(name="a")])
    with pytest.raises(ConfigError, match="unique"):
        EnsembleConfig(members=[MemberConfig(name="fused")])
    with pytest.raises(ConfigError, match="needs a path"):
        RetrievalEnsemble.from_config(EnsembleConfig(members=[MemberConfig(name="a", backend="siglip2")]))


# --------------------------------------------------------------------------------------------------
# Training config and a smoke run (the learning proof is in test_retrieval_learning.py)
# --------------------------------------------------------------------------------------------------


def test_metric_heads_config_file_and_errors() -> None:
    from fashionshoot.retrieval.training import MetricHeadsConfig

    config = load_config(MetricHeadsConfig, REPO / "configs" / "metric_heads.yaml")
    assert config.heads == ["proxynca", "hyperbolic"] and config.proxynca.kind == "proxynca"
    with pytest.raises(ConfigError, match="hyperbolic.kind"):
        load_config(MetricHeadsConfig, overrides=["hyperbolic.kind=proxynca"])
    with pytest.raises(ConfigError, match="distinct"):
        load_config(MetricHeadsConfig, overrides=["heads=[proxynca,proxynca]"])


def test_training_smoke_run_writes_loadable_heads(tmp_path: Path) -> None:
    from fashionshoot.retrieval.training import MetricHeadsConfig, run

    out = tmp_path / "run"
    config = load_config(MetricHeadsConfig, overrides=[
        f"output_dir={out}", "data.synthetic.num_garments=10", "data.synthetic.lookbooks_per_garment=2",
        "data.synthetic.test_fraction=0.3", "backbone.tiny_patches=16", "optim.steps=3", "optim.log_every=1",
        "proxynca.hidden_dim=0", "hyperbolic.embed_dim=8", "cpu=true",
    ])
    results = run(config)
    assert set(results["before"]) == {"proxynca", "hyperbolic"}
    assert set(results["after"]) == {"proxynca", "hyperbolic", "backbone", "fused"}
    for name in ("config.yaml", "results.json", "log.jsonl", "ensemble.yaml", "heads/proxynca/head.safetensors",
                 "heads/hyperbolic/head_config.json"):
        assert (out / name).is_file(), name
    ensemble = RetrievalEnsemble.from_config(load_config(EnsembleConfig, out / "ensemble.yaml"))
    assert set(ensemble.members) == {"proxynca", "hyperbolic"}
    assert ensemble.score(_images(2), _images(3))["fused"].shape == (2, 3)
