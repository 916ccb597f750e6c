"""Feature extractors for the metrics, loaded from local files through :mod:`fashionshoot.weights`.

Why here and not inside the reference packages: clean-fid, torchmetrics and lpips all download their
networks on first use (clean-fid into /tmp, torchvision into the hub cache), which fails offline and
hides which weights produced a number. Here every extractor comes from a named file found by
:func:`fashionshoot.weights.resolve_weight_file` (a path, ``$FASHIONSHOOT_WEIGHTS`` or
``$TORCH_HOME/hub/checkpoints``), a missing file is a :class:`~fashionshoot.errors.MissingWeightsError`
naming it, and each extractor carries an :class:`ExtractorInfo` with the SHA-256 of its weights.
Any ``nn.Module`` can be injected instead (tests use tiny random ones); it is then described by a hash
of its parameters.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fashionshoot.errors import MissingWeightsError
from fashionshoot.weights import hash_weights, resolve_weight_file

PathLike = str | os.PathLike[str]

#: The TF 2015-12-05 Inception-v3, as clean-fid's TorchScript file and as torch-fidelity's state dict.
INCEPTION_FILES = {
    "clean-fid": "inception-2015-12-05.pt",
    "torch-fidelity": "weights-inception-2015-12-05-6726825d.pth",
}
INCEPTION_URLS = {
    "clean-fid": "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    "torch-fidelity": "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth",
}
#: torchvision ImageNet trunks under the file names torchvision itself downloads them as.
LPIPS_TRUNK_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}


@dataclass(frozen=True)
class ExtractorInfo:
    """What produced the features: a name, the weight file and a short SHA-256 of the weights."""

    name: str
    weights_file: str
    weights_hash: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def module_hash(module: nn.Module, length: int = 16) -> str:
    """SHA-256 over a module's parameters and buffers (names, shapes, values), for injected extractors."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:length]


def describe_extractor(module: Any) -> ExtractorInfo:
    """The :class:`ExtractorInfo` of a loaded extractor, or one built from the module's parameters."""
    info = getattr(module, "extractor_info", None)
    if isinstance(info, ExtractorInfo):
        return info
    name = type(module).__name__
    if isinstance(module, nn.Module):
        return ExtractorInfo(name=f"custom:{name}", weights_file="<in memory>", weights_hash=module_hash(module))
    return ExtractorInfo(name=f"custom:{name}", weights_file="<callable>", weights_hash="unknown")


def _weight_file(file_name: str, path: PathLike | None, search_dirs: Iterable[PathLike], source: str) -> Path:
    try:
        return resolve_weight_file(path if path is not None else file_name, search_dirs)
    except MissingWeightsError as exc:
        raise MissingWeightsError(f"{exc}. Get it from {source}") from None


class CleanFidInception(nn.Module):
    """clean-fid's TorchScript Inception without inner resize: input float [0, 255] at 299x299.

    Same computation as ``cleanfid.inception_torchscript.InceptionV3W(resize_inside=False)``, but
    loaded from any local path instead of a fixed file in /tmp (which clean-fid downloads into).
    """

    def __init__(self, path: PathLike, info: ExtractorInfo) -> None:
        super().__init__()
        base = torch.jit.load(str(path), map_location="cpu").eval()
        self.layers = base.layers
        self.extractor_info = info

    def forward(self, x: Tensor) -> Tensor:
        return self.layers.forward((x - 128) / 128).view(x.shape[0], -1)


class TorchFidelityInception(nn.Module):
    """torch-fidelity's Inception (what torchmetrics FID/KID use), fed pre-resized float [0, 255] images.

    torch-fidelity insists on uint8 input, so values are rounded; at 299x299 its inner resize is the identity.
    """

    def __init__(self, path: PathLike, info: ExtractorInfo) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.net = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
        )
        self.extractor_info = info

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.round().clamp(0, 255).to(torch.uint8))


def load_inception(
    kind: str = "clean-fid", path: PathLike | None = None, search_dirs: Iterable[PathLike] = ()
) -> nn.Module:
    """Load the FID/KID Inception of ``kind`` (``clean-fid`` or ``torch-fidelity``) from a local file."""
    if kind not in INCEPTION_FILES:
        raise ValueError(f"unknown Inception kind {kind!r}; known: {', '.join(INCEPTION_FILES)}")
    file = _weight_file(INCEPTION_FILES[kind], path, search_dirs, INCEPTION_URLS[kind])
    info = ExtractorInfo(name=f"inception-v3-2015-12-05:{kind}", weights_file=file.name, weights_hash=hash_weights(file))
    cls = CleanFidInception if kind == "clean-fid" else TorchFidelityInception
    return cls(file, info).eval()


_SLICE_KEY = re.compile(r"slice\d+\.(\d+)\.(.+)")


def load_lpips(
    net: str = "alex", trunk_path: PathLike | None = None, search_dirs: Iterable[PathLike] = ()
) -> nn.Module:
    """The ``lpips`` package's LPIPS with its bundled linear heads and a torchvision trunk from a local file.

    lpips slices ``torchvision.models.<net>().features`` into ``slice{k}.{index}`` blocks; the trunk file
    is a torchvision state dict (``features.{index}.*``), so keys map one to one and load strictly.
    """
    import lpips

    if net not in LPIPS_TRUNK_FILES:
        raise ValueError(f"unknown LPIPS trunk {net!r}; known: {', '.join(LPIPS_TRUNK_FILES)}")
    file = _weight_file(LPIPS_TRUNK_FILES[net], trunk_path, search_dirs, "torchvision's ImageNet weights")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated ``pretrained=`` keyword
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    source = torch.load(file, map_location="cpu", weights_only=True)
    trunk = model.net
    state = {}
    for key in trunk.state_dict():
        match = _SLICE_KEY.fullmatch(key)
        tv_key = f"features.{match.group(1)}.{match.group(2)}" if match else key
        if tv_key not in source:
            raise MissingWeightsError(f"{file}: not a torchvision {net} state dict (no key {tv_key!r})")
        state[key] = source[tv_key]
    trunk.load_state_dict(state, strict=True)
    model.extractor_info = ExtractorInfo(name=f"lpips-0.1:{net}", weights_file=file.name, weights_hash=hash_weights(file))
    return model.eval().requires_grad_(False)
