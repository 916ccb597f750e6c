"""What every fashionshoot metric adds to a torchmetrics ``Metric``: its protocol, in its result.

Why a mixin: the metrics build on torchmetrics classes (FID, KID) or directly on ``Metric`` (LPIPS,
SSIM, CLIP scores), so the shared part is only how a computed value becomes a
:class:`~fashionshoot.metrics.report.MetricResult` naming the settings that define it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchmetrics import Metric

from fashionshoot.metrics.extractors import ExtractorInfo
from fashionshoot.metrics.protocol import DEFAULT_PROTOCOL, Protocol, Setting
from fashionshoot.metrics.report import AGGREGATE, MetricResult


class ProtocolMixin:
    """Holds the protocol, setting and extractor; turns ``compute()`` into a :class:`MetricResult`."""

    metric_name: ClassVar[str]
    #: The protocol fields that change this metric's value (recorded with every result).
    protocol_fields: ClassVar[tuple[str, ...]] = ()
    protocol: Protocol
    setting: Setting
    extractor_info: ExtractorInfo | None

    def _init_protocol(self, protocol: Protocol | None, setting: Setting, info: ExtractorInfo | None) -> None:
        self.protocol = protocol or DEFAULT_PROTOCOL
        self.setting = setting
        self.extractor_info = info

    def protocol_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"name": self.protocol.name, "setting": self.setting}
        record.update({f: getattr(self.protocol, f) for f in self.protocol_fields})
        if self.extractor_info is not None:
            record["extractor"] = self.extractor_info.to_dict()
        return record

    @contextmanager
    def synced_states(self) -> Iterator[None]:
        """Inside: the states gathered from every process, as ``compute()`` sees them; local ones after.

        Why: torchmetrics synchronises states only for the duration of ``compute()``, so a count, std or
        detail read from the states outside it is this rank's alone while the value is global.
        """
        already = self._is_synced  # a caller's own ``sync()``: neither sync twice nor undo theirs
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync and not already,
                               should_unsync=self._should_unsync and not already):
            yield

    def compute_states(self) -> Any:
        """``compute()`` on the states as they are now, without torchmetrics' wrapper (which would sync
        again, and fail, inside :meth:`synced_states`; or return a value cached before a sync)."""
        return type(self).compute(self)

    def result(self, category: str = AGGREGATE) -> MetricResult:
        """Compute and wrap the value with its protocol; value, n, std and details all come from the
        states synchronised across processes."""
        with self.synced_states():
            value, std, n, scale, details = self._result_parts()
        return MetricResult(
            metric=self.metric_name, value=float(value) * scale, std=None if std is None else float(std) * scale,
            n=n, category=category, scale=scale, details=details, protocol=self.protocol_record(),
        )

    def results(self, category: str = AGGREGATE) -> list[MetricResult]:
        """All results of this metric (one here; Recall@k metrics give one per k)."""
        return [self.result(category)]

    def _result_parts(self) -> tuple[float, float | None, int, float, dict[str, Any]]:
        """(value, std, n, scale, details) from the current states; called inside :meth:`synced_states`."""
        raise NotImplementedError


class MeanScoreMetric(ProtocolMixin, Metric):
    """A per-sample score averaged over all samples, with its standard deviation; DDP-safe sums."""

    is_differentiable = False
    full_state_update = False
    #: Protocol field holding the factor ``compute()`` multiplies the mean by (None: no scaling).
    scale_field: ClassVar[str | None] = None
    #: Clamp the (scaled) mean at 0, as torchmetrics' CLIPScore does.
    clamp_at_zero: ClassVar[bool] = False

    def __init__(self, protocol: Protocol | None = None, setting: Setting = "paired",
                 info: ExtractorInfo | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_protocol(protocol, setting, info)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, scores: Tensor) -> None:
        scores = scores.detach().reshape(-1).double()
        self.total += scores.sum()
        self.total_sq += scores.square().sum()
        self.count += scores.numel()

    def _check_count(self) -> None:
        if self.count == 0:
            raise RuntimeError(f"{self.metric_name}: compute() called before any update()")

    def _scale(self) -> float:
        return float(getattr(self.protocol, self.scale_field)) if self.scale_field else 1.0

    def compute(self) -> Tensor:
        self._check_count()
        mean = (self.total / self.count * self._scale()).float()
        return mean.clamp_min(0) if self.clamp_at_zero else mean

    def _std(self) -> float:
        mean = self.total / self.count
        return float((self.total_sq / self.count - mean.square()).clamp_min(0).sqrt())

    def _result_parts(self) -> tuple[float, float | None, int, float, dict[str, Any]]:
        scale = self._scale()
        details = {"clamped_at_zero": True} if self.clamp_at_zero else {}
        return float(self.compute_states()) / scale, self._std(), int(self.count), scale, details
