"""Two ways to photograph one scene: a clean "rendered" look and a camera-like "real" look.

Both styles start from the same shaded label map, so a rendered/real pair has identical geometry
(keypoints, crop box, garment layout) and differs only in image formation: the pairing the
rendered-to-real work trains on. "rendered" = flat colour, hard aliased edges, no noise.
"real" = cylinder shading, directional light, soft edges, lens blur, colour cast, exposure and
gamma drift, vignetting and sensor noise.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageFilter

STYLES: tuple[str, ...] = ("real", "rendered")


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter (area) downsampling by an integer factor: anti-aliased edges."""
    total = sum(image[dy::factor, dx::factor] for dy in range(factor) for dx in range(factor))
    return total / (factor * factor)


def to_image(array: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "RGB")


def render_flat(flat: np.ndarray, supersample: int) -> Image.Image:
    """The "rendered" style: nearest sampling of flat colours, so edges stay hard and colours exact."""
    offset = supersample // 2
    return to_image(flat[offset::supersample, offset::supersample])


@lru_cache(maxsize=8)
def _unit_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates scaled to [-1, 1] (for light falloff and vignetting)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return 2.0 * (xs + 0.5) / width - 1.0, 2.0 * (ys + 0.5) / height - 1.0


def render_real(flat: np.ndarray, shading: np.ndarray, supersample: int, rng: np.random.Generator) -> Image.Image:
    """The "real" style: every camera effect is sampled from ``rng`` (one draw order, deterministic)."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    light_strength = rng.uniform(0.05, 0.2)
    gains = 1.0 + rng.normal(0.0, 0.06, size=3)
    exposure = rng.uniform(0.85, 1.15)
    gamma = rng.uniform(0.85, 1.2)
    vignette = rng.uniform(0.1, 0.4)
    blur = rng.uniform(0.3, 0.9)
    noise = rng.uniform(1.5, 5.0)

    hs, ws = shading.shape
    gx, gy = _unit_grid(hs, ws)
    light = 1.0 + light_strength * (np.cos(angle) * gx + np.sin(angle) * gy)
    image = downsample(flat * (shading * light)[..., None], supersample)
    image = np.clip(image / 255.0 * gains * exposure, 0.0, 1.0) ** gamma * 255.0
    gx, gy = _unit_grid(*image.shape[:2])
    image *= (1.0 - 0.5 * vignette * (gx * gx + gy * gy))[..., None]
    blurred = np.asarray(to_image(image).filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    return to_image(blurred + rng.normal(0.0, noise, size=blurred.shape))
