"""Image inputs for the metrics: one accepted input range, and the resize policies a protocol names.

Why: "which resize" is the largest unstated source of disagreement between published FIDs. Metrics
take float images in [0, 1] (uint8 [0, 255] is accepted and converted exactly); the resize that
brings them to the feature extractor, and the one that brings a reference to the prediction's size,
are chosen by name from the protocol and implemented once here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from fashionshoot.errors import DataError

Images = Tensor | Sequence[Tensor]

_PIL_FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS}


def _check_image(image: Tensor) -> None:
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected RGB images shaped (3, H, W), got {tuple(image.shape)}")


def as_list(images: Images) -> list[Tensor]:
    """A batch tensor (N, 3, H, W) or a sequence of (3, H, W) tensors, as a list of (3, H, W) tensors."""
    items = list(images.unbind(0)) if isinstance(images, Tensor) and images.ndim == 4 else list(images)
    for image in items:
        _check_image(image)
    return items


#: How far float images may stray outside [0, 1] (resampling overshoot, rounding) before it is an error.
RANGE_TOLERANCE = 1e-3


def to_unit(images: Tensor) -> Tensor:
    """Float images in [0, 1]; uint8 is divided by 255, float must already lie in [0, 1].

    Why check: [0, 255] floats (``pil_to_tensor(img).float()``) or [-1, 1] diffusion outputs would
    otherwise give plausible-looking but meaningless numbers.
    """
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    if images.numel():
        low, high = (float(v) for v in torch.aminmax(images.detach()))
        if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
            raise DataError(
                f"expected float images in [0, 1] (or uint8 in [0, 255]), got values in [{low:.4g}, {high:.4g}]; "
                f"{_range_hint(low, high)}"
            )
    return images


def _range_hint(low: float, high: float) -> str:
    if low >= -RANGE_TOLERANCE and high <= 255 + RANGE_TOLERANCE:
        return "for [0, 255] floats divide by 255 or pass uint8"
    if low >= -1 - RANGE_TOLERANCE and high <= 1 + RANGE_TOLERANCE:
        return "for [-1, 1] images use (x + 1) / 2"
    return "rescale them to [0, 1]"


def to_255(image: Tensor) -> Tensor:
    """Float values in [0, 255]; uint8 converts exactly (no round trip through [0, 1])."""
    return image.float() if image.dtype == torch.uint8 else to_unit(image) * 255


def paired_batch(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Check a (prediction, reference) batch for paired metrics and return both as float [0, 1]."""
    if preds.ndim != 4 or preds.shape[1] != 3:
        raise ValueError(f"expected predictions shaped (N, 3, H, W), got {tuple(preds.shape)}")
    if preds.shape != target.shape:
        raise ValueError(
            f"paired metrics need equal shapes: prediction {tuple(preds.shape)} vs reference "
            f"{tuple(target.shape)}; choose a protocol reference_resize other than 'require-equal'"
        )
    return to_unit(preds), to_unit(target)


def _pil_bicubic(image255: Tensor, size: int) -> Tensor:
    """clean-fid's "clean" resize: PIL bicubic per channel in float32 mode, clipped to [0, 255]."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (size, size))
    array = image255.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    return torch.from_numpy(resize(array)).permute(2, 0, 1)


def feature_inputs(images: Images, policy: str, size: int) -> Tensor:
    """Images as the (N, 3, size, size) float [0, 255] batch a feature extractor receives under ``policy``."""
    if isinstance(images, Tensor) and images.ndim == 4 and policy != "pil-bicubic":  # batch fast path
        batch = to_255(images)
        if policy == "none" or batch.shape[-2:] == (size, size):
            return batch
        return F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    items = [to_255(image) for image in as_list(images)]
    if policy == "pil-bicubic":
        return torch.stack([_pil_bicubic(image, size) for image in items]).to(items[0].device)
    if policy == "torch-bilinear":
        return torch.cat([
            F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
            for image in items
        ])
    if policy == "none":
        shapes = {tuple(image.shape) for image in items}
        if len(shapes) != 1:
            raise ValueError(f"feature resize 'none' needs equally sized images, got {sorted(shapes)}")
        return torch.stack(items)
    raise ValueError(f"unknown feature resize policy {policy!r}")


def match_reference(reference: Image.Image, prediction_size: tuple[int, int], policy: str, filter: str) -> Image.Image:
    """Bring a reference image to a prediction of ``prediction_size`` = (width, height) under ``policy``.

    ``to-prediction-height`` is CatVTON's rule: width ``int(w * H / h)``, height ``H``, aspect kept.
    """
    width, height = prediction_size
    if policy == "require-equal":
        return reference
    if policy == "to-prediction":
        target = (width, height)
    elif policy == "to-prediction-height":
        target = (int(reference.width * height / reference.height), height)
    else:
        raise ValueError(f"unknown reference resize policy {policy!r}")
    return reference if reference.size == target else reference.resize(target, _PIL_FILTERS[filter])
