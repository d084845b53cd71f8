"""The stage probe leaves the detector as it found it; the floor table's arithmetic."""

from __future__ import annotations

import time

import pytest
from benchmarks.stages import STAGES, StageProbe, floor_table


class _Branch:
    """A CLIP branch whose ``encode`` calls ``window_embeddings``: both are CLIP stage methods."""

    def encode(self, x: int) -> int:
        time.sleep(0.001)
        return self.window_embeddings(x) + 1

    def window_embeddings(self, x: int) -> int:
        return x


def test_stage_probe_charges_outermost_calls_and_restores_everything():
    import clipfusion.detector as detector_module

    class Det:
        def __init__(self) -> None:
            self.clip, self.diffusion = _Branch(), None

    det, fuse = Det(), detector_module.fuse_components
    with StageProbe(det, "cpu") as probe:
        assert det.clip.encode(1) == 2
    assert probe.calls["CLIP"] == 1  # the nested stage call is not charged twice
    assert probe.seconds["CLIP"] >= 0.001
    assert vars(det.clip) == {}  # the class methods are visible again
    assert detector_module.fuse_components is fuse
    assert probe.missing == []


def test_floor_table_puts_each_kind_at_its_own_peak():
    times = {"seconds": dict.fromkeys(STAGES, 0.0), "total_s": 4.0}
    times["seconds"].update(VAE=3.0, UNet=1.0)
    flops = {"by_stage": {s: {"conv": 0, "matmul": 0} for s in STAGES}}
    flops["by_stage"]["VAE"] = {"conv": 100 * 10**9, "matmul": 0}
    flops["by_stage"]["UNet"] = {"conv": 0, "matmul": 100 * 10**9}
    flops["total"] = {"conv": 100 * 10**9, "matmul": 100 * 10**9}
    dtypes = dict.fromkeys(STAGES, "float32")
    peaks = {"conv": {"float32": 50.0}, "matmul": {"float32": 200.0}}
    table = floor_table(times, flops, dtypes, peaks)
    assert table["stages"]["VAE"]["floor_s"] == pytest.approx(2.0)
    assert table["stages"]["VAE"]["floor_fraction"] == pytest.approx(2.0 / 3.0)
    assert table["stages"]["UNet"]["floor_fraction"] == pytest.approx(0.5)
    assert table["floor_s"] == pytest.approx(2.5) and table["floor_fraction"] == pytest.approx(2.5 / 4.0)
    assert table["stages"]["VAE"]["conv_share"] == 1.0 and table["stages"]["CLIP"]["floor_fraction"] is None
