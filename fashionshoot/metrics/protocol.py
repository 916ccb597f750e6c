"""The evaluation protocol: every setting that changes a metric's number, in one frozen record.

Why: the same checkpoint gets paired FID 6.5, 12.1 or 32.9 on VITON-HD depending on unstated choices
(resize filter, LPIPS trunk, KID subset size and scale, which reference images). A :class:`Protocol`
names all of them; every metric result carries the protocol it was computed under, so two numbers
can be compared only when their protocols agree. ``fashionshoot`` is this library's stated default;
``fashion-rag`` and ``catvton`` reproduce the two protocols peers publish with (see docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from fashionshoot.errors import ConfigError

#: Which Inception-v3 (TF 2015-12-05 weights) port extracts FID/KID features.
InceptionKind = Literal["clean-fid", "torch-fidelity"]
#: How images reach the 299x299 Inception input. ``pil-bicubic`` is clean-fid's "clean" resize (float,
#: per channel, no quantisation); ``torch-bilinear`` is torchmetrics' antialiased bilinear resize;
#: ``none`` feeds images unchanged (for extractors that take any size).
FeatureResize = Literal["pil-bicubic", "torch-bilinear", "none"]
#: How a paired reference is brought to the prediction's size before paired metrics.
ReferenceResize = Literal["require-equal", "to-prediction", "to-prediction-height"]
ResampleFilter = Literal["bicubic", "bilinear", "lanczos"]
LpipsNet = Literal["alex", "vgg", "squeeze"]
#: ``crop``: average the SSIM map without the (kernel-1)/2 border, as scikit-image and Wang et al. do;
#: ``full``: average the whole reflect-padded map, as torchmetrics does (peers' numbers).
SsimBorder = Literal["crop", "full"]
#: ``strict``: fewer images than the KID subset size is an error; ``shrink``: use min(n_real, n_fake,
#: subset_size) as clean-fid does (the subset size actually used is recorded in the result).
KidSubsetPolicy = Literal["strict", "shrink"]
Setting = Literal["paired", "unpaired"]

#: Metrics that compare a generated image with its own ground truth; meaningless when unpaired.
PAIRED_METRICS = ("lpips", "ssim", "psnr")
DISTRIBUTION_METRICS = ("fid", "kid")
ALL_METRICS = (*DISTRIBUTION_METRICS, *PAIRED_METRICS, "clip_t", "clip_i", "garment_recall")


def gaussian_window(sigma: float) -> int:
    """The Gaussian SSIM window, in pixels, for ``sigma``: torchmetrics' int(3.5 sigma + 0.5) * 2 + 1.

    Why a function: with a Gaussian window torchmetrics ignores ``kernel_size`` and derives it from sigma
    (as scikit-image does with truncate=3.5), so the protocol's ``ssim_kernel_size`` must equal this.
    """
    return int(3.5 * sigma + 0.5) * 2 + 1


@dataclass(frozen=True)
class Protocol:
    """Every setting that defines the value of a metric. Serialised into each result."""

    name: str
    description: str
    inception: InceptionKind = "clean-fid"
    feature_resize: FeatureResize = "pil-bicubic"
    feature_size: int = 299
    kid_subset_size: int = 1000
    kid_subsets: int = 100
    kid_subset_policy: KidSubsetPolicy = "strict"
    kid_scale: float = 1.0
    kid_seed: int = 0
    lpips_net: LpipsNet = "alex"
    #: The Gaussian window in pixels; must equal :func:`gaussian_window` of ``ssim_sigma`` (checked).
    ssim_kernel_size: int = 11
    ssim_sigma: float = 1.5
    ssim_border: SsimBorder = "crop"
    data_range: float = 1.0
    reference_resize: ReferenceResize = "require-equal"
    reference_filter: ResampleFilter = "bicubic"
    #: Whether the resized reference (not the original file) also feeds FID/KID (CatVTON: yes).
    resize_reference_for_distribution: bool = False
    clip_t_scale: float = 100.0
    clip_i_scale: float = 1.0
    retrieval_ks: tuple[int, ...] = (1, 5, 10)

    def __post_init__(self) -> None:
        window = gaussian_window(self.ssim_sigma)
        if self.ssim_kernel_size != window:
            raise ConfigError(
                f"protocol {self.name!r}: ssim_kernel_size={self.ssim_kernel_size} does not match "
                f"ssim_sigma={self.ssim_sigma}: the Gaussian SSIM window is int(3.5 * sigma + 0.5) * 2 + 1 = {window} "
                f"pixels (torchmetrics, scikit-image gaussian_weights=True); set ssim_kernel_size={window} or "
                f"change ssim_sigma"
            )

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["retrieval_ks"] = list(self.retrieval_ks)
        out["input_range"] = "float [0, 1] (uint8 [0, 255] accepted and divided by 255)"
        return out

    def replace(self, **changes: Any) -> Protocol:
        """A copy with some settings changed; the name gets a ``+custom`` suffix so it is never mistaken."""
        if not changes:
            return self
        name = changes.pop("name", self.name if self.name.endswith("+custom") else f"{self.name}+custom")
        return dataclasses.replace(self, name=name, **changes)


FASHIONSHOOT = Protocol(
    name="fashionshoot-v1",
    description=(
        "Library default: clean-fid Inception with clean (PIL bicubic float) resize; KID raw (x1) with "
        "1000-image subsets x 100, seeded, error when fewer images; LPIPS-alex; SSIM gaussian 11/1.5 "
        "without the border (scikit-image); "
        "paired metrics require equal sizes; per-category and aggregate over the union."
    ),
)

FASHION_RAG = Protocol(
    name="fashion-rag",
    description=(
        "aimagelab (Fashion-RAG, LaDI-VTON, MGD): clean-fid 0.1.35 mode=clean on original-resolution "
        "references, KID x10^3 with clean-fid's subset shrinking, LPIPS-alex (normalize=True) and SSIM "
        "(data_range 1) on the paired setting only, reference resized to the prediction size (bilinear)."
    ),
    kid_subset_policy="shrink",
    kid_scale=1000.0,
    ssim_border="full",
    reference_resize="to-prediction",
    reference_filter="bilinear",
)

CATVTON = Protocol(
    name="catvton",
    description=(
        "CatVTON eval.py: ground truth resized to the prediction height with LANCZOS (aspect kept) "
        "before every metric, clean-fid FID and KID x10^3 on the resized folder, LPIPS-squeeze, "
        "SSIM data_range 1, paired metrics only with --paired."
    ),
    kid_subset_policy="shrink",
    kid_scale=1000.0,
    lpips_net="squeeze",
    ssim_border="full",
    reference_resize="to-prediction-height",
    reference_filter="lanczos",
    resize_reference_for_distribution=True,
)

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (FASHIONSHOOT, FASHION_RAG, CATVTON)}
PROTOCOLS["fashionshoot"] = FASHIONSHOOT
DEFAULT_PROTOCOL = FASHIONSHOOT


def get_protocol(name: str) -> Protocol:
    """Look up a named protocol (``fashionshoot``, ``fashion-rag``, ``catvton``)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ConfigError(f"unknown metric protocol {name!r}; known: {', '.join(sorted(PROTOCOLS))}") from None
