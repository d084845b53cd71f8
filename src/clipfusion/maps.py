"""Map arithmetic shared by the branches and the fusion: one bilinear resize, one Gaussian smoothing.

Every map in the package is resized by :func:`resize_maps` and smoothed by :func:`gaussian_smooth`, so a
component map brought to the output size by a branch, by the fusion or by an ablation recomputed from stored
native-resolution maps is the same array.
"""

from __future__ import annotations

import functools

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


@functools.lru_cache(maxsize=64)
def smoothing_matrix(size: int, sigma: float) -> torch.Tensor:
    """``(size, size)`` float32 matrix ``B`` with ``x @ B`` = the Gaussian blur of ``x`` along its last axis.

    Column ``j`` holds the kernel centred on ``j`` with scipy's "reflect" boundary folded in (taps that fall
    outside are added to the mirrored pixel, accumulated in float64). One matrix product per axis computes
    the same weighted sums as a padded convolution, up to float32 rounding, at matrix-multiply speed whatever
    σ (a 1-channel ``conv2d`` is several times slower on CPUs, and slower still for large σ, which an
    ablation over σ hits); each row is computed alone, so an image's result does not depend on its batch.
    """
    kernel = gaussian_kernel1d(sigma).double()
    radius = kernel.numel() // 2
    source = _symmetric_indices(size, radius, torch.device("cpu"))
    columns = torch.arange(size)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    for tap in range(kernel.numel()):
        matrix.index_put_((source[columns + tap], columns), kernel[tap].expand(size), accumulate=True)
    return matrix.float()


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(N, H, W)`` maps in float32, equal (to float32 rounding) to
    ``scipy.ndimage.gaussian_filter`` with its defaults (mode "reflect", kernel cut at 4σ), so smoothed maps
    match what reference evaluations do. σ = 0 returns the maps unchanged.
    """
    if sigma <= 0:
        return maps.float()
    x = maps.float()
    height, width = x.shape[-2:]
    x = x @ smoothing_matrix(width, float(sigma)).to(x.device)
    return torch.matmul(smoothing_matrix(height, float(sigma)).to(x.device).T, x)
