"""FID and KID: torchmetrics' metrics with the protocol's resize, a local extractor and seeded KID.

Why subclass rather than rewrite: torchmetrics already keeps DDP-safe feature statistics (FID) and
feature lists (KID). What it lacks, and what this module adds, is (1) images resized by the protocol's
named policy before the extractor (clean-fid's PIL-bicubic by default), (2) an extractor that never
downloads, (3) KID subsets drawn from a seeded generator so a number can be reproduced, with a stated
policy when there are fewer images than the subset size, and (4) results that carry all of it.
The formulas are clean-fid's: FID = |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2) and KID = the unbiased
MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3, averaged over subsets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from fashionshoot.errors import DataError
from fashionshoot.metrics.base import ProtocolMixin
from fashionshoot.metrics.extractors import describe_extractor
from fashionshoot.metrics.images import Images, feature_inputs
from fashionshoot.metrics.protocol import Protocol, Setting

_FEATURE_FIELDS = ("inception", "feature_resize", "feature_size")
#: Feature dtypes a KID rank can tell the others by index while syncing (see ``KID._sync_dist``).
_FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class _FeatureMixin(ProtocolMixin):
    """Shared by FID and KID: resize under the protocol, extract without gradients."""

    inception: nn.Module

    def _setup(self, extractor: nn.Module, protocol: Protocol | None, setting: Setting) -> None:
        self._init_protocol(protocol, setting, describe_extractor(extractor))

    @torch.no_grad()
    def extract(self, images: Images) -> Tensor:
        """Features of ``images`` resized per the protocol; FID and KID of one run can share them."""
        return self.inception(feature_inputs(images, self.protocol.feature_resize, self.protocol.feature_size))

    def update(self, images: Images, real: bool) -> None:  # type: ignore[override]
        """Add float [0, 1] (or uint8) images of any size: a (N, 3, H, W) tensor or a list of (3, H, W)."""
        self.update_features(self.extract(images), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        raise NotImplementedError


class FID(_FeatureMixin, FrechetInceptionDistance):
    """Fréchet distance between Inception features of real and generated images.

    ``update(images, real)`` resizes images per the protocol and extracts features; ``compute()`` is
    torchmetrics' (eigenvalue form of the matrix square root, float64 statistics).
    """

    metric_name = "fid"
    protocol_fields = _FEATURE_FIELDS

    def __init__(self, extractor: nn.Module, protocol: Protocol | None = None, setting: Setting = "unpaired",
                 **kwargs: Any) -> None:
        self._setup(extractor, protocol, setting)
        size = self.protocol.feature_size
        super().__init__(feature=extractor, normalize=True, input_img_size=(3, size, size), **kwargs)

    def update_features(self, features: Tensor, real: bool) -> None:
        """torchmetrics' FID state update, from features already extracted."""
        self.orig_dtype = features.dtype
        features = features.double()
        prefix = "real" if real else "fake"
        setattr(self, f"{prefix}_features_sum", getattr(self, f"{prefix}_features_sum") + features.sum(dim=0))
        setattr(self, f"{prefix}_features_cov_sum", getattr(self, f"{prefix}_features_cov_sum") + features.T @ features)
        setattr(self, f"{prefix}_features_num_samples",
                getattr(self, f"{prefix}_features_num_samples") + features.shape[0])

    def compute(self) -> Tensor:
        if not hasattr(self, "orig_dtype"):  # merged or synchronised states on a process that saw no batch
            self.orig_dtype = torch.float32
        return super().compute()

    def _result_parts(self) -> tuple[float, float | None, int, float, dict[str, Any]]:
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        details = {"n_real": n_real, "n_fake": n_fake, "feature_dim": int(self.real_features_sum.numel())}
        return float(self.compute_states()), None, min(n_real, n_fake), 1.0, details


def kid_subset_size(n_real: int, n_fake: int, protocol: Protocol) -> int:
    """The KID subset size used: the protocol's, or clean-fid's min(n_real, n_fake, size) under ``shrink``."""
    wanted = protocol.kid_subset_size
    if protocol.kid_subset_policy == "shrink":
        return min(n_real, n_fake, wanted)
    if min(n_real, n_fake) < wanted:
        raise DataError(
            f"KID needs at least {wanted} real and generated images per subset (protocol {protocol.name!r}), "
            f"got {n_real} real and {n_fake} generated; lower kid_subset_size or use kid_subset_policy='shrink'"
        )
    return wanted


#: Up to this many samples per side the three kernel matrices are computed once (float64, at most
#: 3 x 4096^2 x 8 B = 400 MB) and every subset's sums are read off them with indicator vectors; beyond
#: it, kernels are computed per subset as torchmetrics and clean-fid do.
FULL_KERNEL_MAX = 4096


def kid_from_features(
    real: Tensor, fake: Tensor, subsets: int, subset_size: int, seed: int,
    degree: int = 3, gamma: float | None = None, coef: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KID mean and (population) std over ``subsets`` random subsets drawn with a seeded CPU generator.

    Each subset's value is clean-fid's / torchmetrics' unbiased MMD^2 with the polynomial kernel
    (x.y * gamma + coef)^degree, gamma = 1/d. Kernel entries are summed in float64: KID is a small
    difference of sums of ~10^6 terms of order 1, which float32 sums get wrong in the 3rd-4th digit.
    """
    if subset_size < 2:
        raise DataError(f"KID needs a subset size of at least 2, got {subset_size}")
    gamma = 1.0 / real.shape[1] if gamma is None else gamma
    m, n_real, n_fake = subset_size, real.shape[0], fake.shape[0]

    def kernel(a: Tensor, b: Tensor) -> Tensor:
        return ((a @ b.T) * gamma + coef).double() ** degree

    generator = torch.Generator().manual_seed(seed)
    draws = [(torch.randperm(n_real, generator=generator)[:m], torch.randperm(n_fake, generator=generator)[:m])
             for _ in range(subsets)]
    if max(n_real, n_fake) <= FULL_KERNEL_MAX:
        # Sum over a subset's block of K = v^T K v with v the subset's indicator: one matmul for all subsets.
        cols = torch.arange(subsets).repeat_interleave(m)
        v_real = torch.zeros(n_real, subsets, dtype=torch.float64, device=real.device)
        v_fake = torch.zeros(n_fake, subsets, dtype=torch.float64, device=fake.device)
        v_real[torch.cat([d[0] for d in draws]).to(real.device), cols.to(real.device)] = 1
        v_fake[torch.cat([d[1] for d in draws]).to(fake.device), cols.to(fake.device)] = 1

        def block_sums(k: Tensor, left: Tensor, right: Tensor) -> Tensor:
            return (left * (k @ right)).sum(0)

        k_rr, k_ff = kernel(real, real), kernel(fake, fake)
        within = (block_sums(k_rr, v_real, v_real) - v_real.T @ k_rr.diagonal()
                  + block_sums(k_ff, v_fake, v_fake) - v_fake.T @ k_ff.diagonal())
        del k_rr, k_ff
        cross = block_sums(kernel(real, fake), v_real, v_fake)
        scores = within / (m * (m - 1)) - 2 * cross / m**2
    else:
        values = []
        for ir, jf in draws:
            x, y = real[ir.to(real.device)], fake[jf.to(fake.device)]
            kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
            within = kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()
            values.append(within / (m * (m - 1)) - 2 * kxy.sum() / m**2)
        scores = torch.stack(values)
    return scores.mean(), scores.std(unbiased=False)


class KID(_FeatureMixin, KernelInceptionDistance):
    """Kernel Inception distance with seeded subsets; ``compute()`` returns raw (mean, std).

    The protocol's ``kid_scale`` (e.g. 1000 for the "KID x10^3" papers report) is applied in
    :meth:`result`, which also records the subset size actually used.
    """

    metric_name = "kid"
    protocol_fields = (*_FEATURE_FIELDS, "kid_subset_size", "kid_subsets", "kid_subset_policy", "kid_scale",
                       "kid_seed")

    def __init__(self, extractor: nn.Module, protocol: Protocol | None = None, setting: Setting = "unpaired",
                 **kwargs: Any) -> None:
        self._setup(extractor, protocol, setting)
        super().__init__(feature=extractor, subsets=self.protocol.kid_subsets,
                         subset_size=self.protocol.kid_subset_size, **kwargs)

    def update_features(self, features: Tensor, real: bool) -> None:
        (self.real_features if real else self.fake_features).append(features)

    def _features(self) -> tuple[Tensor, Tensor]:
        real, fake = (dim_zero_cat(f) if len(f) else None for f in (self.real_features, self.fake_features))
        if real is None or fake is None or not len(real) or not len(fake):
            raise DataError("KID needs both real and generated images; one side received none")
        return real, fake

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any = None) -> None:
        """Give a side this rank saw no images of a ``(0, D)`` placeholder in the other ranks' width and
        dtype before torchmetrics gathers it: torchmetrics' own placeholder is 1-D, which cannot be
        gathered beside ``(N, D)`` features (the ranks' collectives then disagree and gloo fails), as
        when a category's images all land on one rank."""
        seen = [f for f in (*self.real_features, *self.fake_features) if f.ndim == 2]
        mine = [seen[0].shape[1], _FEATURE_DTYPES.index(seen[0].dtype)] if seen else [-1, -1]
        shapes = dist_sync_fn(torch.tensor(mine, device=self.device), group=process_group or self.process_group)
        known = [[int(v) for v in s] for s in shapes if int(s[0]) >= 0]
        if known:
            width, dtype = known[0][0], _FEATURE_DTYPES[known[0][1]]
            for name in ("real_features", "fake_features"):
                if not len(getattr(self, name)):
                    setattr(self, name, [torch.zeros(0, width, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = self._features()
        size = kid_subset_size(real.shape[0], fake.shape[0], self.protocol)
        return kid_from_features(real, fake, self.subsets, size, self.protocol.kid_seed,
                                 self.degree, self.gamma, self.coef)

    def _result_parts(self) -> tuple[float, float | None, int, float, dict[str, Any]]:
        real, fake = self._features()  # gathered from every process: the counts the value is computed from
        mean, std = self.compute_states()
        details = {
            "n_real": real.shape[0], "n_fake": fake.shape[0],
            "subset_size_used": kid_subset_size(real.shape[0], fake.shape[0], self.protocol),
            "subsets": self.subsets, "feature_dim": real.shape[1],
        }
        return float(mean), float(std), min(real.shape[0], fake.shape[0]), self.protocol.kid_scale, details
