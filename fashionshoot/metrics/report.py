"""Metric results that carry their protocol, and their JSON / markdown forms.

Why: a bare "FID 6.5" cannot be compared with anything. A :class:`MetricResult` keeps the value with
the settings that define it (extractor and weights hash, resize policy, KID subset size/count/scale,
paired or unpaired, category, sample count); an :class:`EvaluationReport` groups results per category
plus the aggregate and renders them as JSON (machine-readable, complete) and as a markdown table
whose header states the scale of each column.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AGGREGATE = "all"

#: Column headers: lower/higher-is-better arrows, like the papers' tables.
_HEADERS = {
    "fid": "FID↓", "kid": "KID↓", "lpips": "LPIPS↓", "ssim": "SSIM↑", "psnr": "PSNR↑",
    "clip_t": "CLIP-T↑", "clip_i": "CLIP-I↑",
}


@dataclass
class MetricResult:
    """One number with everything needed to reproduce or compare it."""

    metric: str
    value: float
    n: int
    category: str = AGGREGATE
    std: float | None = None
    scale: float = 1.0
    details: dict[str, Any] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["value"] = _json_float(self.value)
        out["std"] = None if self.std is None else _json_float(self.std)
        return out

    @property
    def header(self) -> str:
        base = _HEADERS.get(self.metric, self.metric)
        if self.metric.startswith("garment_r@"):
            base = f"Garment R@{self.metric.split('@')[1]}↑"
        return base if self.scale == 1 else f"{base} (×{_format_scale(self.scale)})"


def _json_float(value: float) -> float | str:
    """JSON has no inf/nan: keep them as strings (PSNR of identical images is inf)."""
    return value if math.isfinite(value) else str(value)


def _format_scale(scale: float) -> str:
    exponent = math.log10(scale) if scale > 0 else 0
    return f"10^{int(exponent)}" if exponent.is_integer() and exponent >= 2 else f"{scale:g}"


@dataclass
class EvaluationReport:
    """Results per category and aggregate, with the protocol and the run's own settings."""

    protocol: dict[str, Any]
    setting: str
    results: list[MetricResult] = field(default_factory=list)
    skipped_metrics: dict[str, str] = field(default_factory=dict)
    faults: dict[str, Any] = field(default_factory=dict)

    def categories(self) -> list[str]:
        seen = dict.fromkeys(r.category for r in self.results)
        return [c for c in seen if c != AGGREGATE] + ([AGGREGATE] if AGGREGATE in seen else [])

    def get(self, metric: str, category: str = AGGREGATE) -> MetricResult:
        for result in self.results:
            if result.metric == metric and result.category == category:
                return result
        raise KeyError(f"no result for metric {metric!r} in category {category!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "setting": self.setting,
            "results": [r.to_dict() for r in self.results],
            "skipped_metrics": self.skipped_metrics,
            "faults": self.faults,
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def markdown_rows(self, label: str = "") -> tuple[str, list[str]]:
        """A header line and one row per category (aggregate last); ``label`` fills the first column."""
        metrics = list(dict.fromkeys(r.metric for r in self.results))
        headers = ["model", "protocol", "setting", "category", "n"]
        headers += [next(r.header for r in self.results if r.metric == m) for m in metrics]
        rows = []
        for category in self.categories():
            by_metric = {r.metric: r for r in self.results if r.category == category}
            n = max((r.n for r in by_metric.values()), default=0)
            cells = [label, str(self.protocol.get("name", "")), self.setting, category, str(n)]
            cells += [_format_value(by_metric[m]) if m in by_metric else "–" for m in metrics]
            rows.append("| " + " | ".join(cells) + " |")
        head = "| " + " | ".join(headers) + " |\n|" + "|".join("---" for _ in headers) + "|"
        return head, rows

    def to_markdown(self, label: str = "") -> str:
        head, rows = self.markdown_rows(label)
        return "\n".join([head, *rows]) + "\n"


def _format_value(result: MetricResult) -> str:
    if not math.isfinite(result.value):
        return str(result.value)
    return f"{result.value:.4f}" if abs(result.value) < 100 else f"{result.value:.2f}"
