"""Combining the four component maps into one anomaly map and one image score.

The paper's Eq. 4 (maps, α = 0.25) and Eq. 9 (scores, α = 0.75) weight the CLIP terms by α and the diffusion
terms by 1 − α. Zero-shot, the visual (memory-bank) terms are zero. Smoothing is linear, so smoothing each
component and then fusing equals fusing and then smoothing; smoothing the components first also gives the
"max of the smoothed map" image terms of Eq. 9 for free.

The fusion is split in steps, :func:`smooth_components` (resize to the output size and smooth: the
expensive part, which depends on σ only), :func:`term_sums` (the two sums of Eq. 4, independent of α),
:func:`weigh` (Eq. 4) and :func:`image_scores` (Eq. 9), chained by :func:`combine`, so that an ablation over
α and the score rule smooths and sums once per σ; :func:`fuse` chains them and
:func:`fuse_components` applies a configuration. Every path runs the same code, so a detector's maps and a
sweep recomputed from stored native-resolution maps are the same numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from clipfusion.config import FUSION_TERMS, SCORE_MODES
from clipfusion.errors import ConfigError
from clipfusion.maps import gaussian_smooth, resize_maps

if TYPE_CHECKING:
    from clipfusion.config import CLIPFusionConfig

CLIP_TERMS = ("clip_L", "clip_V")
DIFFUSION_TERMS = ("diff_L", "diff_V")
MAP_NAMES = FUSION_TERMS


def smooth_components(
    maps: dict[str, torch.Tensor], *, sigma: float, output_size: int
) -> dict[str, torch.Tensor]:
    """Each given component map (any subset of ``MAP_NAMES``, any grid) resized to ``output_size`` by
    :func:`~clipfusion.maps.resize_maps` and smoothed by :func:`~clipfusion.maps.gaussian_smooth`."""
    present = {name: maps[name] for name in MAP_NAMES if maps.get(name) is not None}
    return {name: gaussian_smooth(resize_maps(m, output_size), sigma) for name, m in present.items()}


def term_sums(smoothed: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clip_L + clip_V, diff_L + diff_V)`` of smoothed maps (absent ones count as zero): the two sums
    Eq. 4 weighs, which do not depend on α (an α sweep computes them once)."""
    if not smoothed:
        raise ValueError("no component map to fuse")
    first = next(iter(smoothed.values()))
    zeros = torch.zeros(first.shape[0], *first.shape[-2:])
    clip = sum((smoothed[k] for k in CLIP_TERMS if k in smoothed), zeros)
    diffusion = sum((smoothed[k] for k in DIFFUSION_TERMS if k in smoothed), zeros)
    return clip, diffusion


def weigh(
    sums: tuple[torch.Tensor, torch.Tensor],
    alpha: float,
    *,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eq. 4 on :func:`term_sums`: ``α · clip + (1 − α) · diffusion``.

    ``out``: two buffers shaped like the sums to compute into (the same operations, so the same numbers),
    returning the first: a sweep over α then writes its large maps into the same memory every time.
    """
    clip, diffusion = sums
    if out is None:
        return alpha * clip + (1.0 - alpha) * diffusion
    weighted, other = out
    torch.mul(clip, alpha, out=weighted)
    torch.mul(diffusion, 1.0 - alpha, out=other)
    return torch.add(weighted, other, out=weighted)


def image_scores(
    smoothed: dict[str, torch.Tensor],
    s_clip_L: torch.Tensor | None,
    *,
    alpha_score: float,
    score_mode: str = "terms",
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
    peaks: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eq. 9 (``terms``: ``s_clip_L`` and the maxima of the other smoothed maps) or the maximum of the map
    fused with ``alpha_score`` (``max``). ``sums`` (:func:`term_sums`) and ``peaks`` (each map's maximum)
    can be passed when already computed."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    if score_mode == "max":
        score = weigh(sums if sums is not None else term_sums(smoothed), alpha_score).flatten(1).amax(dim=1)
    else:
        peak = peaks if peaks is not None else {k: v.flatten(1).amax(dim=1) for k, v in smoothed.items()}
        zero = torch.zeros(next(iter(smoothed.values())).shape[0])
        clip_score = peak.get("clip_V", zero)
        if s_clip_L is not None:
            clip_score = clip_score + s_clip_L.float()
        elif "clip_L" in peak:
            clip_score = clip_score + peak["clip_L"]
        diffusion_score = peak.get("diff_L", zero) + peak.get("diff_V", zero)
        score = alpha_score * clip_score + (1.0 - alpha_score) * diffusion_score
    if not math.isfinite(float(score.sum())):
        raise FloatingPointError("the fused scores contain NaN or inf")
    return score


def combine(
    smoothed: dict[str, torch.Tensor],
    s_clip_L: torch.Tensor | None,
    *,
    alpha_map: float,
    alpha_score: float,
    score_mode: str = "terms",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 4 and Eq. 9 on smoothed component maps (absent ones count as zero): ``(anomaly_map, score)``."""
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    sums = term_sums(smoothed)
    score = image_scores(smoothed, s_clip_L, alpha_score=alpha_score, score_mode=score_mode, sums=sums)
    return weigh(sums, alpha_map), score


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
    """Fuse component maps (any subset of ``MAP_NAMES``, any grid; absent ones count as zero).

    Returns ``(anomaly_map (N,S,S), score (N,), smoothed component maps)``. With ``score_mode="terms"`` the
    score is Eq. 9 with ``s_clip_L`` (the global CLIP probability) and the maxima of the other smoothed maps;
    with ``"max"`` it is the maximum of the smoothed map fused with ``alpha_score``.
    """
    if score_mode not in SCORE_MODES:
        raise ValueError(f"score_mode must be one of {SCORE_MODES}, got {score_mode!r}")
    smoothed = smooth_components(maps, sigma=sigma, output_size=output_size)
    anomaly_map, score = combine(
        smoothed, s_clip_L, alpha_map=alpha_map, alpha_score=alpha_score, score_mode=score_mode
    )
    return anomaly_map, score, smoothed


def select_terms(
    maps: dict[str, torch.Tensor], s_clip_L: torch.Tensor | None, terms: tuple[str, ...] | list[str]
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The component maps (and ``s_clip_L``, the image term of ``clip_L``) that the fusion ``terms`` keep.

    Raises :class:`~clipfusion.errors.ConfigError` when none of the kept maps is present (e.g. only
    memory-bank maps asked for in a zero-shot run).
    """
    kept = {name: maps[name] for name in MAP_NAMES if name in terms and maps.get(name) is not None}
    if not kept:
        present = [name for name in MAP_NAMES if maps.get(name) is not None]
        raise ConfigError(
            f"terms {'+'.join(terms)}: none of these maps is computed here (present: {', '.join(present)}; "
            "zero-shot runs have no clip_V or diff_V)"
        )
    return kept, (s_clip_L if "clip_L" in terms else None)


def fuse_components(
    components: dict[str, torch.Tensor], config: CLIPFusionConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fuse` with a configuration's options: its ``terms``, α's, σ, score rule and output size.

    ``components`` are the branches' outputs (maps at any grid, ``s_clip_L``); the detector and the sweep of
    stored maps both fuse through here.
    """
    maps, s_clip_L = select_terms(components, components.get("s_clip_L"), config.terms)
    return fuse(
        maps,
        s_clip_L,
        alpha_map=config.alpha_map,
        alpha_score=config.alpha_score,
        sigma=config.sigma,
        output_size=config.output_size,
        score_mode=config.score_mode,
    )
