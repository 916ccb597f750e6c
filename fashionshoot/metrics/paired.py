"""Paired metrics: LPIPS, SSIM and PSNR between each generated image and its own ground truth.

Why own ``Metric`` classes: torchmetrics' LPIPS builds its trunk with a download and its PSNR averages
the squared error over the whole dataset before the log, while papers report the mean of per-image
scores. These classes reduce per-image scores (mean and std, DDP-safe sums) using the ``lpips`` package
and torchmetrics' functional SSIM/PSNR for the per-image values. Inputs are float [0, 1] (or uint8)
batches of equal shape; bringing a reference to the prediction's size is the protocol's
``reference_resize``, applied when images are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from fashionshoot.metrics.base import MeanScoreMetric
from fashionshoot.metrics.extractors import describe_extractor
from fashionshoot.metrics.images import paired_batch
from fashionshoot.metrics.protocol import Protocol, Setting

_REFERENCE_FIELDS = ("reference_resize", "reference_filter")


class LPIPS(MeanScoreMetric):
    """Mean LPIPS distance; ``net`` is an ``lpips.LPIPS`` from :func:`~fashionshoot.metrics.extractors.load_lpips`."""

    metric_name = "lpips"
    higher_is_better = False
    protocol_fields = ("lpips_net", *_REFERENCE_FIELDS)

    def __init__(self, net: nn.Module, protocol: Protocol | None = None, setting: Setting = "paired",
                 **kwargs: Any) -> None:
        super().__init__(protocol, setting, describe_extractor(net), **kwargs)
        self.net = net

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = paired_batch(preds, target)
        self._accumulate(self.net(preds, target, normalize=True))


class SSIM(MeanScoreMetric):
    """Mean per-image SSIM with a Gaussian window of ``ssim_sigma`` (``ssim_kernel_size`` pixels wide, which
    the protocol checks matches sigma); ``ssim_border`` decides whether the border is averaged
    (torchmetrics) or cropped (scikit-image ``gaussian_weights=True``)."""

    metric_name = "ssim"
    higher_is_better = True
    protocol_fields = ("ssim_kernel_size", "ssim_sigma", "ssim_border", "data_range", *_REFERENCE_FIELDS)

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = paired_batch(preds, target)
        p = self.protocol
        scores, ssim_map = structural_similarity_index_measure(
            preds, target, gaussian_kernel=True, sigma=p.ssim_sigma, kernel_size=p.ssim_kernel_size,
            data_range=p.data_range, reduction="none", return_full_image=True,
        )
        if p.ssim_border == "crop":
            pad = p.ssim_kernel_size // 2  # the window radius (the protocol checks it matches sigma)
            scores = ssim_map[..., pad:-pad, pad:-pad].mean(dim=(1, 2, 3))
        self._accumulate(scores)


class PSNR(MeanScoreMetric):
    """Mean of per-image PSNR in dB (identical images give inf, which is kept, not hidden)."""

    metric_name = "psnr"
    higher_is_better = True
    protocol_fields = ("data_range", *_REFERENCE_FIELDS)

    def update(self, preds: Tensor, target: Tensor) -> None:
        preds, target = paired_batch(preds, target)
        scores = peak_signal_noise_ratio(
            preds, target, data_range=self.protocol.data_range, reduction="none", dim=(1, 2, 3)
        )
        self._accumulate(scores)
