""""""

import pytest
import torch

from clipfusion.fusion import fuse


def _maps(n=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(n, s, s, generator=g) for name in ("clip_L", "clip_V", "diff_L", "diff_V")}


def test_eq4_weights_clip_by_alpha_and_diffusion_by_one_minus_alpha():
    maps = _maps()
    fused, _, _ = fuse(maps, None, alpha_map=0.25, alpha_score=0.75, sigma=0.0, output_size=16)
    expected = 0.25 * (maps["clip_L"] + maps["clip_V"]) + 0.75 * (maps["diff_L"] + maps["diff_V"])
    torch.testing.assert_close(fused, expected)


def test_zero_shot_uses_only_language_maps():
    maps = _maps()
    zero_shot = {"clip_L": maps["clip_L"], "diff_L": maps["diff_L"]}
    s_clip = torch.tensor([0.2, 0.9])
    fused, score, _ = fuse(zero_shot, s_clip, alpha_map=0.25, alpha_score=0.75, sigma=0.0, output_size=16)
    torch.testing.assert_close(fused, 0.25 * maps["clip_L"] + 0.75 * maps["diff_L"])
    expected = 0.75 * s_clip + 0.25 * maps["diff_L"].flatten(1).amax(1)
    torch.testing.assert_close(score, expected)


def test_eq9_score_terms_use_smoothed_maxima():
    maps = _maps(s=32)
    s_clip = torch.tensor([0.3, 0.6])
    _, score, smoothed = fuse(maps, s_clip, alpha_map=0.25, alpha_score=0.75, sigma=2.0, output_size=32)
    peak = {k: v.flatten(1).amax(1) for k, v in smoothed.items()}
    expected = 0.75 * (s_clip + peak["clip_V"]) + 0.25 * (peak["diff_L"] + peak["diff_V"])
    torch.testing.assert_close(score, expected)


def test_score_mode_max_is_the_peak_of_the_map_fused_with_alpha_score():
    maps = _maps()
    fused75, _, _ = fuse(maps, None, alpha_map=0.75, alpha_score=0.75, sigma=1.0, output_size=16)
    _, score, _ = fuse(
        maps, None, alpha_map=0.25, alpha_score=0.75, sigma=1.0, output_size=16, score_mode="max"
    )
    torch.testing.assert_close(score, fused75.flatten(1).amax(1))


def test_maps_of_other_sizes_are_resized():
    maps = {"clip_L": torch.rand(1, 15, 15), "diff_L": torch.rand(1, 32, 32)}
    fused, _, smoothed = fuse(maps, None, alpha_map=0.5, alpha_score=0.5, sigma=0.0, output_size=64)
    assert fused.shape == (1, 64, 64)
    assert smoothed["clip_L"].shape == (1, 64, 64)


def test_nothing_to_fuse_or_bad_mode_raises():
    with pytest.raises(ValueError, match="no component map"):
        fuse({}, None, alpha_map=0.25, alpha_score=0.75, sigma=0.0, output_size=8)
    with pytest.raises(ValueError, match="score_mode"):
        fuse(_maps(), None, alpha_map=0.25, alpha_score=0.75, sigma=0.0, output_size=16, score_mode="mean")


def test_fusion_of_reduced_precision_maps_is_float32():
    maps = {
        "clip_L": torch.rand(2, 8, 8).to(torch.bfloat16),
        "diff_L": torch.rand(2, 16, 16).to(torch.bfloat16),
    }
    anomaly_map, score, smoothed = fuse(
        maps, torch.rand(2).to(torch.bfloat16), alpha_map=0.25, alpha_score=0.75, sigma=1.0, output_size=16
    )
    assert anomaly_map.dtype == score.dtype == torch.float32
    assert all(m.dtype == torch.float32 for m in smoothed.values())
