"""Train ProxyNCA++ / hyperbolic heads on a frozen backbone and measure held-out garment retrieval.

The loop behind ``train/metric_heads.py``. Backbone features of every garment image and every
(cropped) lookbook are computed once and cached; heads then train on the cache, so a run costs one
backbone pass plus seconds of head updates. Classes are garment ids: a garment's product shot and its
lookbooks share a class. Batches hold ``classes_per_batch`` garments with *all* their images, so every
anchor has positives (the contrastive hyperbolic loss needs them).

Evaluation is lookbook -> garment retrieval on the test split (garments held out from training, so a
head must generalise to unseen garments), reported as R@k for the untrained and trained heads, the
zero-shot backbone and the fused ensemble of the trained heads. Under ``accelerate launch`` every
process computes the feature cache, samples different batches and gradients are averaged (DDP);
the replicas stay identical (``results["replica_spread"]``, the largest parameter difference between
processes, is 0.0), every process evaluates the same heads and process 0 alone writes. Outputs in ``output_dir``: ``heads/<kind>/`` (loadable with
:meth:`~fashionshoot.retrieval.heads.MetricHead.from_pretrained`), ``ensemble.yaml`` (an
:class:`~fashionshoot.retrieval.ensemble.EnsembleConfig` of the trained heads), ``results.json``,
``log.jsonl`` and the resolved ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image

from fashionshoot.config import save_config, to_dict
from fashionshoot.data.records import PairRecord
from fashionshoot.data.synthetic import SyntheticConfig
from fashionshoot.errors import ConfigError, DataError
from fashionshoot.retrieval.ensemble import EnsembleConfig, RetrievalEnsemble
from fashionshoot.retrieval.fusion import FusionMethod
from fashionshoot.retrieval.heads import HEAD_TYPES, HeadConfig, HeadKind, MetricHead, build_head
from fashionshoot.retrieval.members import (
    BackboneFeatures,
    Backend,
    FeatureMode,
    HeadEncoder,
    MemberConfig,
    build_backbone,
)

#: Small enough to generate in seconds, large enough that held-out recall is not noise.
DEFAULT_SYNTHETIC = SyntheticConfig(num_garments=300, lookbooks_per_garment=3, styles=("real",),
                                    garment_size=(64, 64), lookbook_size=(96, 64))


@dataclass
class DataConfig:
    """Pairs to train on: a manifest (``.jsonl``/``.parquet``), else the synthetic set generated into
    ``<output_dir>/synthetic``. ``crop_lookbooks`` uses each pair's ``crop_box`` as the query view (the
    pair builder scores detector crops the same way)."""

    manifest: str = ""
    synthetic: SyntheticConfig = field(default_factory=lambda: DEFAULT_SYNTHETIC)
    crop_lookbooks: bool = True
    train_split: str = "train"
    test_split: str = "test"


@dataclass
class BackboneConfig:
    """The frozen backbone. Empty ``path``: a tiny random SigLIP2 with ``tiny_patches`` 8-pixel
    patches is written to ``<output_dir>/backbone`` (a plumbing default; real runs set a path)."""

    backend: Backend = "siglip2"
    path: str = ""
    features: FeatureMode = "tokens"
    layers: int = 0
    batch_size: int = 64
    tiny_patches: int = 256


@dataclass
class OptimConfig:
    """Head optimisation. ``proxy_lr_mult`` scales the ProxyNCA++ proxies' learning rate."""

    steps: int = 600
    classes_per_batch: int = 32
    lr: float = 1e-3
    proxy_lr_mult: float = 100.0
    weight_decay: float = 1e-4
    log_every: int = 100


@dataclass
class EvalConfig:
    """Held-out evaluation; ``fuse_backbone`` adds the zero-shot backbone to the fused ensemble."""

    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    fusion: FusionMethod = "zscore"
    fuse_backbone: bool = False


@dataclass
class MetricHeadsConfig:
    """``train/metric_heads.py``: which heads (``heads``), each kind's settings, data, backbone."""

    output_dir: str = "runs/metric_heads"
    seed: int = 0
    heads: list[HeadKind] = field(default_factory=lambda: ["proxynca", "hyperbolic"])
    proxynca: HeadConfig = field(default_factory=lambda: HeadConfig(kind="proxynca", dropout=0.2))
    hyperbolic: HeadConfig = field(default_factory=lambda: HeadConfig(kind="hyperbolic"))
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cpu: bool = False

    def __post_init__(self) -> None:
        if not self.heads or len(set(self.heads)) != len(self.heads):
            raise ConfigError(f"heads: expected distinct kinds from {sorted(HEAD_TYPES)}, got {self.heads}")
        for kind in HEAD_TYPES:
            if getattr(self, kind).kind != kind:
                raise ConfigError(f"{kind}.kind must be {kind!r}, got {getattr(self, kind).kind!r}")


# --------------------------------------------------------------------------------------------------
# Data and the feature cache
# --------------------------------------------------------------------------------------------------


def load_pairs(config: DataConfig, output_dir: Path) -> tuple[list[PairRecord], Path]:
    """The pair records and the folder their image paths are relative to."""
    if config.manifest:
        from fashionshoot.data.pairs import read_manifest

        path = Path(config.manifest)
        return read_manifest(path), path.parent
    from fashionshoot.data.synthetic import load_synthetic_config, write_synthetic_set

    root = output_dir / "synthetic"
    settings = root / "synthetic.json"
    if not (settings.is_file() and (root / "pairs.jsonl").is_file() and load_synthetic_config(settings) == config.synthetic):
        write_synthetic_set(root, config.synthetic)
    from fashionshoot.data.pairs import read_manifest

    return read_manifest(root / "pairs.jsonl"), root


@dataclass
class FeatureCache:
    """Backbone features of every garment (one row per id) and every lookbook view (one per pair)."""

    garment_ids: list[str]
    garments: torch.Tensor
    lookbook_garments: list[str]
    lookbooks: torch.Tensor
    splits: dict[str, str]

    @classmethod
    def build(cls, records: Sequence[PairRecord], root: Path, extract: Callable[[list[Image.Image]], torch.Tensor],
              crop_lookbooks: bool) -> FeatureCache:
        """Run ``extract`` (images -> (N, F)) once over all garments and lookbooks."""
        from fashionshoot.data.images import load_image

        first: dict[str, PairRecord] = {}
        for r in records:
            first.setdefault(r.garment_id, r)
        ids = sorted(first)
        garments = extract([load_image(root / first[g].garment_image) for g in ids])
        lookbooks = extract([lookbook_view(load_image(root / r.lookbook_image), r, crop_lookbooks) for r in records])
        return cls(ids, garments, [r.garment_id for r in records], lookbooks, {g: first[g].split for g in ids})

    def split(self, name: str) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor]:
        """(garment ids, garment features, lookbook labels, lookbook features) of one split."""
        keep = [i for i, g in enumerate(self.garment_ids) if self.splits[g] == name]
        keep_l = [i for i, g in enumerate(self.lookbook_garments) if self.splits[g] == name]
        if not keep or not keep_l:
            raise DataError(f"split {name!r} has {len(keep)} garments and {len(keep_l)} lookbooks; need both")
        return ([self.garment_ids[i] for i in keep], self.garments[keep],
                [self.lookbook_garments[i] for i in keep_l], self.lookbooks[keep_l])


def lookbook_view(image: Image.Image, record: PairRecord, crop: bool) -> Image.Image:
    """The query view of a lookbook: its ``crop_box`` region when ``crop`` (and the box is usable)."""
    if not crop or record.crop_box is None:
        return image
    x1, y1, x2, y2 = record.crop_box
    box = (max(0, int(x1)), max(0, int(y1)), min(image.width, int(round(x2))), min(image.height, int(round(y2))))
    return image.crop(box) if box[2] - box[0] >= 2 and box[3] - box[1] >= 2 else image


@dataclass
class TrainingSet:
    """Features and integer class labels of the training split (garments first, then lookbooks)."""

    features: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    @classmethod
    def from_cache(cls, cache: FeatureCache, split: str) -> TrainingSet:
        ids, g_feats, l_ids, l_feats = cache.split(split)
        index = {g: i for i, g in enumerate(ids)}
        labels = torch.tensor([index[g] for g in ids] + [index[g] for g in l_ids])
        return cls(torch.cat([g_feats, l_feats]), labels, len(ids))

    def batches(self, classes_per_batch: int, generator: torch.Generator):
        """Endless batches of ``classes_per_batch`` random classes with all their samples."""
        members = [torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)]
        per_batch = min(classes_per_batch, self.num_classes)
        while True:
            classes = torch.randperm(self.num_classes, generator=generator)[:per_batch]
            idx = torch.cat([members[c] for c in classes.tolist()])
            yield self.features[idx], self.labels[idx]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class HeldOut:
    """Lookbook queries vs garment gallery of the test split (features or embeddings, same order)."""

    queries: torch.Tensor
    gallery: torch.Tensor
    positives: torch.Tensor

    @classmethod
    def from_cache(cls, cache: FeatureCache, split: str) -> HeldOut:
        ids, g_feats, l_ids, l_feats = cache.split(split)
        positives = torch.tensor([[q == g for g in ids] for q in l_ids], dtype=torch.bool)
        return cls(l_feats, g_feats, positives)


def held_out_recall(members: dict[str, Any], embedded: dict[str, HeldOut], ks: Sequence[int],
                    fusion: FusionMethod, fuse: Sequence[str]) -> dict[str, dict[str, float]]:
    """R@k of each member on its held-out embeddings, plus ``"fused"`` over the members in ``fuse``."""
    from fashionshoot.retrieval.evaluation import recall_at_k

    ensemble = RetrievalEnsemble(members, fusion=fusion)
    scores = ensemble.member_scores({n: e.queries for n, e in embedded.items()},
                                    {n: e.gallery for n, e in embedded.items()})
    if len(fuse) > 1:
        scores["fused"] = ensemble.fuse({n: scores[n] for n in fuse})
    positives = next(iter(embedded.values())).positives
    return {name: recall_at_k(s, positives, ks) for name, s in scores.items()}


def embed_held_out(member: HeadEncoder, held_out: HeldOut) -> HeldOut:
    """A head member's embeddings of held-out backbone features."""
    return HeldOut(member.embed_features(held_out.queries), member.embed_features(held_out.gallery),
                   held_out.positives)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def train_head(head: MetricHead, data: TrainingSet, optim: OptimConfig, accelerator: Any,
               log: Any = None) -> list[float]:
    """Optimise ``head`` on ``data`` for ``optim.steps`` steps; returns the per-step loss (this process)."""
    optimizer = torch.optim.AdamW(head.param_groups(optim.lr, optim.proxy_lr_mult), weight_decay=optim.weight_decay)
    model, optimizer = accelerator.prepare(head, optimizer)
    generator = torch.Generator().manual_seed(1000 + accelerator.process_index)
    batches = data.batches(optim.classes_per_batch, generator)
    losses = []
    model.train()
    for step in range(1, optim.steps + 1):
        features, labels = next(batches)
        features, labels = features.to(accelerator.device), labels.to(accelerator.device)
        loss = head.loss(model(features), labels)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        losses.append(float(loss.detach()))
        if log is not None and (step % optim.log_every == 0 or step == optim.steps):
            log({"head": head.kind, "step": step, "loss": sum(losses[-optim.log_every:]) / len(losses[-optim.log_every:])})
    head.eval()
    return losses


def replica_spread(module: torch.nn.Module, accelerator: Any) -> float:
    """Largest absolute difference of any parameter of ``module`` between processes (0.0 in a single
    process). DDP starts every replica from process 0's weights and applies the same averaged
    gradients, so anything but 0.0 means the replicas drifted apart (recorded in ``results.json``)."""
    flat = torch.cat([p.detach().float().flatten() for p in module.parameters()]).to(accelerator.device)
    gathered = accelerator.gather(flat[None])
    return float((gathered - gathered[:1]).abs().max())


def _backbone(config: BackboneConfig, output_dir: Path, device: str) -> tuple[Backend, str, Any]:
    path = config.path
    if not path:
        from fashionshoot import testing

        tiny = output_dir / "backbone"
        if not (tiny / "config.json").is_file():
            testing.save_tiny_siglip2(tiny, max_patches=config.tiny_patches)
        path = str(tiny.resolve())
    return config.backend, path, build_backbone(config.backend, path, device, config.batch_size, name="backbone")


def run(config: MetricHeadsConfig) -> dict[str, Any]:
    """Train the configured heads and return (and write) the results; see the module docstring."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=config.cpu)
    set_seed(config.seed)
    out = Path(config.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        load_pairs(config.data, out)
        _backbone(config.backbone, out, "cpu")
    accelerator.wait_for_everyone()  # rank 0 generated the data / tiny backbone
    records, root = load_pairs(config.data, out)
    backend, path, encoder = _backbone(config.backbone, out, str(accelerator.device))
    extract = BackboneFeatures(encoder, config.backbone.features, config.backbone.layers)
    cache = FeatureCache.build(records, root, extract, config.data.crop_lookbooks)
    train_set = TrainingSet.from_cache(cache, config.data.train_split)
    held_out = HeldOut.from_cache(cache, config.data.test_split)
    provenance = {"backend": backend, "path": path, **extract.spec}

    log_path = out / "log.jsonl"

    def log(entry: dict[str, Any]) -> None:
        if accelerator.is_main_process:
            accelerator.print(json.dumps(entry))
            with log_path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")

    ks, fusion = config.eval.ks, config.eval.fusion
    results: dict[str, Any] = {"before": {}, "after": {}, "final_loss": {}}
    trained: dict[str, HeadEncoder] = {}
    for kind in config.heads:
        torch.manual_seed(config.seed)
        head_config = dataclasses.replace(getattr(config, kind), in_dim=cache.garments.shape[1],
                                          num_classes=train_set.num_classes, backbone=provenance)
        head = build_head(head_config).to(accelerator.device)
        untrained = HeadEncoder(extract, head, name=kind)
        results["before"][kind] = held_out_recall({kind: untrained}, {kind: embed_held_out(untrained, held_out)},
                                                  ks, fusion, ())[kind]
        losses = train_head(head, train_set, config.optim, accelerator, log)
        window = losses[-config.optim.log_every:]
        results["final_loss"][kind] = sum(window) / len(window)
        results.setdefault("replica_spread", {})[kind] = replica_spread(head, accelerator)
        trained[kind] = HeadEncoder(extract, accelerator.unwrap_model(head).eval(), name=kind)

    # The zero-shot backbone, as the paper's SigLIP2 member: its own embeddings of the held-out views.
    test_records = [r for r in records if cache.splits[r.garment_id] == config.data.test_split]
    zero_shot = HeldOut.from_cache(FeatureCache.build(test_records, root, encoder.embed_images,
                                                      config.data.crop_lookbooks), config.data.test_split)
    members: dict[str, Any] = {**trained, "backbone": encoder}
    embedded = {**{k: embed_held_out(m, held_out) for k, m in trained.items()}, "backbone": zero_shot}
    fuse = [*trained, *(["backbone"] if config.eval.fuse_backbone else [])]
    results["after"] = held_out_recall(members, embedded, ks, fusion, fuse)
    results["processes"] = accelerator.num_processes
    results["protocol"] = {"queries": "test lookbooks" + (" (crop_box views)" if config.data.crop_lookbooks else ""),
                           "gallery": "test garments", "queries_n": len(held_out.queries),
                           "gallery_n": len(held_out.gallery), "train_classes": train_set.num_classes,
                           "fusion": fusion, "fused_members": fuse}
    if accelerator.is_main_process:
        _save(config, out, trained, results)
        log({"results": results})
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also tears down the process group, so exiting cannot abort in gloo threads
    return results


def _save(config: MetricHeadsConfig, out: Path, trained: dict[str, HeadEncoder], results: dict[str, Any]) -> None:
    members = []
    for kind, member in trained.items():
        folder = member.head.save_pretrained(out / "heads" / kind)
        members.append(MemberConfig(name=kind, backend=config.backbone.backend, head=str(folder.resolve())))
    ensemble = EnsembleConfig(members=members, fusion=config.eval.fusion)
    (out / "ensemble.yaml").write_text(yaml.safe_dump(to_dict(ensemble), sort_keys=False))
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    save_config(config, out)
