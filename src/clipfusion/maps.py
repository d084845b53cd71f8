"""Map arithmetic shared by the branches and the fusion: one bilinear resize, one Gaussian smoothing.

Every map in the package is resized by :func:`resize_maps` and smoothed by :func:`gaussian_smooth`, so a
component map brought to the output size by a branch, by the fusion or by an ablation recomputed from stored
native-resolution maps is the same array.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_maps(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``(..., h, w)`` maps to ``(..., size, size)`` (or to
    ``(..., height, width)`` for ``size = (height, width)``), float32.

    Any leading shape is kept (``(N, h, w)`` or ``(N, C, h, w)``); a map already at the size comes back
    unchanged (as float32). Bilinear interpolation is a convex combination, so the maps' bounds are kept.
    """
    shape = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    maps = maps.float()
    if maps.shape[-2:] == shape:
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    out = F.interpolate(flat, size=shape, mode="bilinear", align_corners=False)
    return out.reshape(*lead, *shape)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    radius = max(1, int(truncate * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    # scipy's "reflect" (half-sample symmetric: d c b a | a b c d | d c b a), valid for any radius
    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i < size, i, 2 * size - 1 - i)


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` maps in float32, equal to ``scipy.ndimage.gaussian_filter``
    with its defaults (mode "reflect", kernel cut at 4σ), so smoothed maps match what reference evaluations
    do. σ = 0 returns the maps unchanged.
    """
    if sigma <= 0:
        return maps.float()
    kernel = gaussian_kernel1d(sigma).to(maps.device)
    radius = kernel.numel() // 2
    x = maps.float().unsqueeze(1)
    height, width = x.shape[-2:]
    x = x.index_select(3, _symmetric_indices(width, radius, x.device))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = x.index_select(2, _symmetric_indices(height, radius, x.device))
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)
