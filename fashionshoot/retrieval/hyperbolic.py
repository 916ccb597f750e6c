"""Poincaré-ball operations for hyperbolic embeddings (Hyp-ViT / Hyp-DINO, Ermolov et al. 2022).

A hyperbolic head maps Euclidean features into the Poincaré ball of curvature ``-c`` (radius
``1/sqrt(c)``) with the exponential map at the origin and ranks by geodesic distance. Hierarchies embed
there with low distortion, which is the argument for using it in metric learning. Two practical
details from the literature are built in:

- **feature clipping** (Guo et al., "Clipped Hyperbolic Classifiers", CVPR 2022): Euclidean features are
  shrunk to norm at most ``clip_r`` *before* the exponential map, so points never reach the ball's
  boundary where gradients vanish;
- **projection** back inside the ball by a small margin, because float rounding can land ``tanh(..)``
  exactly on the boundary, where the distance is infinite.

Distances are computed for all pairs at once from norms and inner products (one matmul), so scoring a
query block against a gallery costs the same as cosine similarity plus elementwise work.
"""

from __future__ import annotations

import torch

#: Keep points this far (relative to the radius) inside the ball; matches hyptorch's float32 margin.
BALL_EPS = 1e-5
_MIN_NORM = 1e-15
#: Largest ``sqrt(c) * ||(-x) ⊕ y||`` two projected points can reach: antipodal points at scaled norm
#: ``r = 1 - BALL_EPS`` give ``tanh(2 artanh r) = 2r / (1 + r²)``. Capping any lower would merge all
#: far-apart pairs into one distance.
_MAX_ARG = 2 * (1 - BALL_EPS) / (1 + (1 - BALL_EPS) ** 2)
#: Squared scaled norm ``c ||x||²`` above which :func:`poincare_distance` works in float64. The defaults
#: (``c = 0.1``, ``clip_r = 2.3``) keep points at ``tanh(sqrt(c) * 2.3)² ≈ 0.39``, in float32.
DOUBLE_PRECISION_ABOVE = 0.9


def clip_features(x: torch.Tensor, clip_r: float | None) -> torch.Tensor:
    """Shrink rows of ``x`` to Euclidean norm at most ``clip_r`` (no-op when ``clip_r`` is None)."""
    if clip_r is None:
        return x
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return x * (clip_r / norm).clamp(max=1.0)


def project(x: torch.Tensor, c: float) -> torch.Tensor:
    """Pull points that rounding pushed onto (or past) the boundary back inside the ball."""
    max_norm = (1 - BALL_EPS) / c**0.5
    norm = x.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return torch.where(norm > max_norm, x / norm * max_norm, x)


def expmap0(v: torch.Tensor, c: float) -> torch.Tensor:
    """Exponential map at the origin: tangent vectors ``v`` -> points in the ball of curvature ``-c``."""
    sqrt_c = c**0.5
    norm = v.norm(dim=-1, keepdim=True).clamp_min(_MIN_NORM)
    return project(torch.tanh(sqrt_c * norm) * v / (sqrt_c * norm), c)


def to_ball(x: torch.Tensor, c: float, clip_r: float | None = None) -> torch.Tensor:
    """Clip, then map to the ball: the full Euclidean -> hyperbolic step of a hyperbolic head."""
    return expmap0(clip_features(x, clip_r), c)


def poincare_distance(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """Geodesic distances between every row of ``x`` (..., N, D) and every row of ``y`` (..., M, D).

    Returns (..., N, M); leading dimensions broadcast like ``x @ y.mT`` (a query block against its
    own candidate lists is ``(B, 1, D)`` vs ``(B, C, D)``). ``d(x, y) = 2/sqrt(c) * artanh(sqrt(c) *
    ||(-x) ⊕_c y||)`` with the Möbius sum's norm expanded in ``||x||², ||y||², <x, y>``, so no
    (N, M, D) tensor is ever built.
    """
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    work = torch.float64 if out_dtype == torch.float64 or _near_boundary(x, y, c) else torch.float32
    x, y = x.to(work), y.to(work)
    xy = x @ y.mT  # <x, y>; the Möbius sum uses u = -x, so <u, y> = -xy
    x2 = (x * x).sum(-1, keepdim=True)  # (..., N, 1)
    y2 = (y * y).sum(-1).unsqueeze(-2)  # (..., 1, M)
    a = 1 - 2 * c * xy + c * y2  # coefficient of u
    b = 1 - c * x2  # coefficient of y
    num_sq = (a * a * x2 - 2 * a * b * xy + b * b * y2).clamp_min(_MIN_NORM**2)  # sqrt'(0) is inf
    den = (1 - 2 * c * xy + c * c * x2 * y2).clamp_min(_MIN_NORM**2)
    sqrt_c = c**0.5
    arg = (sqrt_c * num_sq.sqrt() / den).clamp(max=_MAX_ARG if work == torch.float64 else 1 - BALL_EPS)
    return (2 / sqrt_c * torch.atanh(arg)).to(out_dtype)


def _near_boundary(x: torch.Tensor, y: torch.Tensor, c: float) -> bool:
    """Whether some point lies in the ball's outer band (``c ||x||² > DOUBLE_PRECISION_ABOVE``).

    There ``1 - c ||x||²`` is small and ``num_sq`` a difference of nearly equal terms that float32
    cancels to noise (every distance then hits the cap and the ranking is random), so the distance is
    computed in float64. Inside it, float32 is exact enough and ~2.7x faster (one host sync per call)."""
    norms = [float((t.detach() ** 2).sum(-1).max()) for t in (x, y) if t.numel()]  # a choice, not part of the graph
    return bool(norms) and c * max(norms) > DOUBLE_PRECISION_ABOVE
