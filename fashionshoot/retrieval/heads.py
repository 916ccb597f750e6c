"""Metric-learning heads on top of backbone features: ProxyNCA++ and hyperbolic (Poincaré) heads.

The Virtual Fashion Photo-Shoots ensemble combines zero-shot SigLIP2 with two supervised metric
learners, ProxyNCA++ (Teh et al., ECCV 2020) and Hyp-DINO (Ermolov et al., CVPR 2022). Here both are
*heads*: small modules trained on (usually frozen, cached) backbone features, so one backbone pass
serves several members and a head trains in seconds to minutes.

- :class:`ProxyNCAHead` — L2-normalised embeddings, one learnable proxy per class, softmax over
  ``-||x - p||² / T`` with a low temperature (``T = 1/9``); the proxies get their own, much larger,
  learning rate ("fast-moving proxies", :meth:`MetricHead.param_groups`). pytorch-metric-learning's
  ProxyNCA lacks the temperature and the proxy learning-rate split, which carry most of the gain.
- :class:`HyperbolicHead` — features are clipped (Guo et al. 2022) and mapped into the Poincaré ball;
  the loss is Hyp-ViT's pairwise cross-entropy on negative geodesic distances, generalised to
  several positives per anchor (supervised contrastive), and retrieval ranks by ``-distance``.

For garment-lookbook pairs the class is the garment id, so a garment's product shot and its lookbooks
share a proxy / are positives of each other. A head saves as ``head.safetensors`` + ``head_config.json``
(which also records the backbone it was trained on) and loads with :meth:`MetricHead.from_pretrained`.
This module imports torch and safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fashionshoot.errors import ConfigError
from fashionshoot.retrieval import hyperbolic

HeadKind = Literal["proxynca", "hyperbolic"]
Metric = Literal["cosine", "poincare"]
CONFIG_NAME = "head_config.json"
WEIGHTS_NAME = "head.safetensors"


@dataclass
class HeadConfig:
    """Everything needed to rebuild a head (saved as ``head_config.json``).

    ``hidden_dim`` 0 gives a linear head; otherwise a two-layer MLP, which a weak or frozen backbone
    needs to separate fine-grained garments. ``temperature`` None means the kind's published default
    (ProxyNCA++ 1/9, Hyp-ViT 0.2). ``curvature`` and ``clip_r`` apply to hyperbolic heads only;
    ``num_classes`` (proxies) to ProxyNCA++ heads only. ``in_dim`` 0 (the default in training configs)
    is filled in from the backbone features before the head is built. ``backbone`` is provenance: the member config
    and feature mode the head was trained on, so a saved head can rebuild its input pipeline.
    """

    kind: HeadKind = "proxynca"
    in_dim: int = 0
    embed_dim: int = 128
    hidden_dim: int = 512
    layer_norm: bool = True
    dropout: float = 0.0
    temperature: float | None = None
    num_classes: int = 0
    curvature: float = 0.1
    clip_r: float | None = 2.3
    backbone: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in HEAD_TYPES:
            raise ConfigError(f"head.kind {self.kind!r}: expected one of {sorted(HEAD_TYPES)}")
        if self.in_dim < 0 or self.embed_dim < 1 or self.hidden_dim < 0:
            raise ConfigError(f"head: embed_dim must be >= 1, in_dim and hidden_dim >= 0, got "
                              f"{self.embed_dim}, {self.in_dim}, {self.hidden_dim}")
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"head.temperature must be > 0, got {self.temperature}")
        if self.curvature <= 0:
            raise ConfigError(f"head.curvature must be > 0, got {self.curvature}")

    @property
    def resolved_temperature(self) -> float:
        return self.temperature if self.temperature is not None else HEAD_TYPES[self.kind].default_temperature


def supervised_contrastive_loss(similarity: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over anchors of ``-mean_p log softmax_j(sim_ij / T)[p]`` over the anchor's positives ``p``.

    ``similarity`` is the (N, N) batch similarity (cosine, or ``-distance``); the diagonal is
    excluded from both numerator and denominator. With exactly two views per class this is Hyp-ViT's
    pairwise cross-entropy (NT-Xent); anchors without a positive in the batch are ignored.
    """
    n = similarity.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=similarity.device)
    logits = (similarity / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    positives = (labels[:, None] == labels[None, :]) & ~eye
    counts = positives.sum(dim=1)
    has_pos = counts > 0
    if not has_pos.any():
        raise ValueError("supervised_contrastive_loss: no anchor has a positive in the batch")
    per_anchor = -(log_prob * positives).sum(dim=1)[has_pos] / counts[has_pos]
    return per_anchor.mean()


def proxy_nca_loss(embeddings: torch.Tensor, proxies: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """ProxyNCA++: cross-entropy of ``softmax(-||x̂ - p̂||² / T)`` over all (normalised) proxies."""
    x = F.normalize(embeddings, dim=-1)
    p = F.normalize(proxies, dim=-1)
    sq_dist = (2 - 2 * x @ p.T).clamp_min(0)  # ||x - p||² for unit vectors
    return F.cross_entropy(-sq_dist / temperature, labels)


class MetricHead(nn.Module):
    """Shared trunk, similarity, parameter groups and save/load; subclasses define the geometry.

    ``forward(features)`` returns the retrieval embedding; ``similarity(queries, gallery)`` scores
    every query against every gallery row (higher is better); ``loss(embeddings, labels)`` is the
    training objective for one batch.
    """

    kind: ClassVar[str]
    metric: ClassVar[Metric]
    default_temperature: ClassVar[float]

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.LayerNorm(config.in_dim)] if config.layer_norm else []
        if config.hidden_dim:
            layers += [nn.Linear(config.in_dim, config.hidden_dim), nn.GELU(), nn.Dropout(config.dropout),
                       nn.Linear(config.hidden_dim, config.embed_dim)]
        else:
            layers += [nn.Dropout(config.dropout), nn.Linear(config.in_dim, config.embed_dim)]
        self.trunk = nn.Sequential(*layers)

    @property
    def temperature(self) -> float:
        return self.config.resolved_temperature

    def similarity(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(..., Q, G) scores of query rows against gallery rows (leading dims broadcast), higher = better."""
        raise NotImplementedError

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def param_groups(self, lr: float, proxy_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups; ProxyNCA++ puts its proxies in a faster group."""
        return [{"params": list(self.trunk.parameters()), "lr": lr}]

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """Write ``head_config.json`` and ``head.safetensors`` into ``save_dir``."""
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(save_dir / WEIGHTS_NAME))
        return save_dir

    @staticmethod
    def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> MetricHead:
        """Load a saved head of either kind (the kind is read from its config), in eval mode."""
        from safetensors.torch import load_file

        path = Path(path)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            raise ConfigError(f"{path}: not a metric head folder (no {CONFIG_NAME})")
        data = json.loads(config_file.read_text())
        known = {f.name for f in fields(HeadConfig)}
        if set(data) - known:
            raise ConfigError(f"{config_file}: unknown key(s) {sorted(set(data) - known)}")
        head = build_head(HeadConfig(**data))
        head.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        return head.to(device).eval()


class ProxyNCAHead(MetricHead):
    """ProxyNCA++ head: unit-norm embeddings, cosine retrieval, one proxy per training class."""

    kind = "proxynca"
    metric = "cosine"
    default_temperature = 1 / 9

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        self.proxies = nn.Parameter(torch.randn(max(config.num_classes, 1), config.embed_dim) / 8)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.trunk(features), dim=-1)

    def similarity(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return queries.float() @ gallery.float().mT

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.config.num_classes < 1:
            raise ConfigError("ProxyNCA++ head: set num_classes (one proxy per training class) to train it")
        return proxy_nca_loss(embeddings, self.proxies, labels, self.temperature)

    def param_groups(self, lr: float, proxy_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        return [*super().param_groups(lr), {"params": [self.proxies], "lr": lr * proxy_lr_mult}]


class HyperbolicHead(MetricHead):
    """Hyp-ViT-style head: clip, exponential map into the Poincaré ball, rank by ``-distance``."""

    kind = "hyperbolic"
    metric = "poincare"
    default_temperature = 0.2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return hyperbolic.to_ball(self.trunk(features), self.config.curvature, self.config.clip_r)

    def similarity(self, queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return -hyperbolic.poincare_distance(queries, gallery, self.config.curvature)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return supervised_contrastive_loss(self.similarity(embeddings, embeddings), labels, self.temperature)


HEAD_TYPES: dict[str, type[MetricHead]] = {"proxynca": ProxyNCAHead, "hyperbolic": HyperbolicHead}


def build_head(config: HeadConfig) -> MetricHead:
    """A freshly initialised head of ``config.kind``."""
    if config.in_dim < 1:
        raise ConfigError("head.in_dim: set the backbone feature width before building a head")
    return HEAD_TYPES[config.kind](config)
