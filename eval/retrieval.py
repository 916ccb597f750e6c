"""Paper-style retrieval table: R@1/5/10 per member and fused, per benchmark.

    python eval/retrieval.py [--config configs/eval_retrieval.yaml] [key=value ...]

With no arguments it runs on a freshly generated synthetic set with tiny random SigLIP2 / CLIP models
(chance level: they check the plumbing, not quality) and the colour-histogram baseline, so it works on
any machine. Point ``members`` at real checkpoints and ``dresscode_root`` / ``deepfashion2_root`` at
local copies for the real benchmarks. Prints a markdown table; writes ``results.json``, ``table.md``
and the resolved ``config.yaml`` to ``out_dir``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fashionshoot.config import config_from_argv, save_config
from fashionshoot.errors import script_exit_code
from fashionshoot.retrieval.ensemble import RetrievalEnsemble
from fashionshoot.retrieval.evaluation import (
    RAG_KS,
    RetrievalTask,
    deepfashion2_task,
    dresscode_task,
    evaluate,
    markdown_table,
    synthetic_task,
    synthetic_text_task,
)
from fashionshoot.retrieval.fusion import FusionMethod
from fashionshoot.retrieval.members import MemberConfig, build_members


@dataclass
class EvalRetrievalConfig:
    """Which members, which fusion, which benchmarks. Empty ``members``: tiny models + histogram."""

    out_dir: str = "runs/eval_retrieval"
    members: list[MemberConfig] = field(default_factory=list)
    fusion: FusionMethod = "zscore"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    synthetic_root: str = ""
    synthetic_garments: int = 40
    synthetic_lookbooks_per_garment: int = 2
    text_to_garment: bool = True
    dresscode_root: str = ""
    deepfashion2_root: str = ""
    limit: int | None = None
    device: str = "cpu"


def default_members(root: Path) -> list[MemberConfig]:
    """Tiny random SigLIP2 and CLIP written under ``root`` (reused when present) plus the histogram."""
    from fashionshoot import testing

    siglip, clip = root / "tiny_siglip2", root / "tiny_clip"
    if not (siglip / "config.json").is_file():
        testing.save_tiny_siglip2(siglip)
    if not (clip / "config.json").is_file():
        testing.save_tiny_clip(clip)
    return [MemberConfig("tiny-siglip2", "siglip2", str(siglip)), MemberConfig("tiny-clip", "clip", str(clip)),
            MemberConfig("histogram", "histogram")]


def tasks(config: EvalRetrievalConfig, out: Path) -> list[RetrievalTask]:
    root = Path(config.synthetic_root) if config.synthetic_root else out / "synthetic"
    if not (root / "pairs.jsonl").is_file():
        from fashionshoot.data.synthetic import SyntheticConfig, write_synthetic_set

        write_synthetic_set(root, SyntheticConfig(num_garments=config.synthetic_garments, styles=("real",),
                                                  lookbooks_per_garment=config.synthetic_lookbooks_per_garment))
    out_tasks = [synthetic_task(root, "garment->lookbook", config.limit),
                 synthetic_task(root, "lookbook->garment", config.limit)]
    if config.text_to_garment:
        out_tasks.append(synthetic_text_task(root, config.limit))
    if config.dresscode_root:
        from fashionshoot.data.sets import DressCode

        out_tasks.append(dresscode_task(DressCode(config.dresscode_root, split="test")))
    if config.deepfashion2_root:
        from fashionshoot.data.sets import DeepFashion2

        out_tasks.append(deepfashion2_task(DeepFashion2(config.deepfashion2_root, split="validation", crop=True)))
    return out_tasks


def main(argv: list[str]) -> int:
    config = config_from_argv(EvalRetrievalConfig, argv)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.members = config.members or default_members(out / "models")
    members = config.members
    scorer = RetrievalEnsemble(build_members(members, config.device), config.fusion,
                               {m.name: m.weight for m in members})
    results, protocols = {}, {}
    for task in tasks(config, out):
        ks = sorted(set(config.ks) | (set(RAG_KS) if task.text_queries else set()))
        results[task.name] = evaluate(scorer, task, ks, precision=task.text_queries)
        protocols[task.name] = {**task.protocol, "queries": len(task.queries), "gallery": len(task.gallery)}
    table = markdown_table(results, config.ks)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"results": results, "protocols": protocols,
                                                  "members": [m.name for m in members]}, indent=1) + "\n")
    save_config(config, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_exit_code("eval/retrieval.py", lambda: main(sys.argv[1:])))
