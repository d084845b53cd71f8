"""Combining the four component maps into one anomaly map and one image score.

The paper's Eq. 4 (maps, α = 0.25) and Eq. 9 (scores, α = 0.75) weight the CLIP terms by α and the diffusion
terms by 1 − α. Zero-shot, the visual (memory-bank) terms are zero. Smoothing is linear, so smoothing each
component and then fusing equals fusing and then smoothing; smoothing the components first also gives the
"max of the smoothed map" image terms of Eq. 9 for free.
"""

from __future__ import annotations

import math

import torch

from clipfusion.config import SCORE_MODES
from clipfusion.maps import gaussian_smooth, resize_maps

CLIP_TERMS = ("clip_L", "clip_V")
DIFFUSION_TERMS = ("diff_L", "diff_V")
MAP_NAMES = CLIP_TERMS + DIFFUSION_TERMS


def fuse(
    maps: dict[str, torch.Tensor],
    s_clip_L: torch.Tensor | None,
    *,
    alpha_map: float,
    alpha_score: float,
    sigma: float,
    output_size: int,
    score_mode: str = "terms",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Fuse component maps (any subset of ``MAP_NAMES``; absent ones count as zero).

    Returns ``(anomaly_map (N,S,S), score (N,), smoothed component maps)``. With ``score_mode="terms"`` the
    score is Eq. 9 with ``s_clip_L`` (the global CLIP probability) and the maxima of the other smoothed maps;
    with ``"max"`` it is the maximum of the smoothed map fused with ``alpha_score``.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    present = {name: maps[name] for name in MAP_NAMES if maps.get(name) is not None}
    if not present:
        raise ValueError("no component map to fuse")
    smoothed = {name: gaussian_smooth(resize_maps(m, output_size), sigma) for name, m in present.items()}
    n = next(iter(smoothed.values())).shape[0]
    zeros = torch.zeros(n, output_size, output_size)

    def combine(alpha: float) -> torch.Tensor:
        clip = sum((smoothed[k] for k in CLIP_TERMS if k in smoothed), zeros)
        diffusion = sum((smoothed[k] for k in DIFFUSION_TERMS if k in smoothed), zeros)
        return alpha * clip + (1.0 - alpha) * diffusion

    anomaly_map = combine(alpha_map)
    if score_mode == "max":
        score = combine(alpha_score).flatten(1).amax(dim=1)
    else:
        peak = {k: v.flatten(1).amax(dim=1) for k, v in smoothed.items()}
        zero = torch.zeros(n)
        clip_score = peak.get("clip_V", zero)
        if s_clip_L is not None:
            clip_score = clip_score + s_clip_L.float()
        elif "clip_L" in peak:
            clip_score = clip_score + peak["clip_L"]
        diffusion_score = peak.get("diff_L", zero) + peak.get("diff_V", zero)
        score = alpha_score * clip_score + (1.0 - alpha_score) * diffusion_score
    if not math.isfinite(float(score.sum())):
        raise FloatingPointError("the fused scores contain NaN or inf")
    return anomaly_map, score, smoothed
