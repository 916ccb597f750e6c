"""R@k / P@k against brute-force references, the protocols, and the eval script's default run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from fashionshoot.errors import DataError
from fashionshoot.retrieval.encoders import HistogramEncoder
from fashionshoot.retrieval.ensemble import RetrievalEnsemble
from fashionshoot.retrieval.evaluation import (
    RetrievalTask,
    evaluate,
    markdown_table,
    precision_at_k,
    recall_at_k,
)

ROOT = Path(__file__).resolve().parents[1]


def _brute_recall(scores, positives, k, found=None):
    hits = answerable = 0
    for q in range(scores.shape[0]):
        if not positives[q].any():
            continue
        answerable += 1
        if found is not None and not found[q]:
            continue
        best = max(float(scores[q, j]) for j in range(scores.shape[1]) if positives[q, j])
        above = sum(1 for j in range(scores.shape[1]) if not positives[q, j] and float(scores[q, j]) >= best)
        hits += above < k
    return hits / answerable


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_and_precision_equal_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (20, 30), generator=g).float()  # many ties on purpose
    positives = torch.rand(20, 30, generator=g) < 0.08
    positives[0] = False  # unanswerable query: left out
    found = torch.rand(20, generator=g) < 0.8
    for f in (None, found):
        got = recall_at_k(scores, positives, (1, 5, 10), f)
        for k in (1, 5, 10):
            assert got[f"R@{k}"] == pytest.approx(_brute_recall(scores, positives, k, f))
    distinct = torch.randn(20, 30, generator=g)
    answerable = [q for q in range(20) if positives[q].any()]
    for f in (None, found):
        p = precision_at_k(distinct, positives, (1, 3), f)
        for k in (1, 3):  # the queries recall counts; a not-found query scores 0
            top = distinct.argsort(dim=1, descending=True)[:, :k]
            expected = sum(float(positives[q, top[q]].sum()) / k for q in answerable if f is None or f[q])
            assert p[f"P@{k}"] == pytest.approx(expected / len(answerable))


def test_precision_counts_the_same_queries_as_recall():
    # every query ranks its positive first, but the detector found none of them: a miss, not P@1 = 1
    scores, positives = torch.eye(4) + 0.01 * torch.arange(4.0), torch.eye(4, dtype=torch.bool)
    task = RetrievalTask("t", [0] * 4, [0] * 4, positives, found=torch.zeros(4, dtype=torch.bool))
    assert precision_at_k(scores, positives, (1,), task.found) == {"P@1": 0.0}
    assert precision_at_k(scores, positives, (1,), torch.tensor([1, 1, 0, 0])) == {"P@1": 0.5}
    positives[3] = False  # an unanswerable query is left out, as in recall
    assert precision_at_k(scores, positives, (1,)) == {"P@1": 1.0}


def test_undetected_queries_count_as_misses_and_shapes_are_checked():
    scores = torch.eye(4)
    positives = torch.eye(4, dtype=torch.bool)
    assert recall_at_k(scores, positives, (1,))["R@1"] == 1.0
    assert recall_at_k(scores, positives, (1,), found=torch.tensor([1, 1, 0, 0]))["R@1"] == 0.5
    with pytest.raises(DataError, match="must be equal"):
        recall_at_k(scores, positives[:3], (1,))
    with pytest.raises(DataError, match="no query"):
        recall_at_k(scores, torch.zeros(4, 4, dtype=torch.bool), (1,))


def test_evaluate_reports_every_member_and_the_fusion():
    from PIL import Image

    colours = [(200, 32, 42), (30, 42, 92), (22, 132, 74)]  # red, navy, emerald
    gallery = [Image.new("RGB", (16, 16), c) for c in colours]
    queries = [Image.new("RGB", (24, 20), c) for c in colours[::-1]]
    positives = torch.eye(3, dtype=torch.bool).flip(0)
    scorer = RetrievalEnsemble({"h4": HistogramEncoder("h4", bins=4), "h8": HistogramEncoder("h8", bins=8)})
    result = evaluate(scorer, RetrievalTask("toy", queries, gallery, positives), ks=(1, 2))
    assert set(result) == {"h4", "h8", "fused"} and result["fused"]["R@1"] == 1.0
    text = evaluate(scorer, RetrievalTask("text", ["a red dress", "a navy coat"], gallery[:2],
                                          torch.eye(2, dtype=torch.bool), text_queries=True), ks=(1,), precision=True)
    assert text["h4"] == {"R@1": 1.0, "P@1": 1.0}
    table = markdown_table({"toy": result}, ks=(1, 2))
    assert "| toy | fused | 100.0 | 100.0 |" in table


def test_eval_script_default_run_on_the_synthetic_set(tmp_path, capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("eval_retrieval", ROOT / "eval" / "retrieval.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    assert module.main([f"out_dir={tmp_path}", "synthetic_garments=12"]) == 0
    printed = capsys.readouterr().out
    assert "| synthetic g->l | fused |" in printed and "| synthetic text->garment | histogram |" in printed
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["results"]["synthetic g->l"]) == {"tiny-siglip2", "tiny-clip", "histogram", "fused"}
    assert saved["protocols"]["synthetic g->l"]["queries"] == 12
    assert "P@20" in saved["results"]["synthetic text->garment"]["fused"]
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "table.md").is_file()
