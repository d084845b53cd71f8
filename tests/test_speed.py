"""`clipfusion.speed`: per-stage timing runs the same steps as predict, on the real branches."""

import numpy as np
from PIL import Image

from clipfusion.detector import CLIPFusion
from clipfusion.speed import measure, stage_seconds
from fakes import fake_detector


def _images(n):
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(n)]


def test_stage_seconds_cover_both_branches_and_the_fusion():
    det = CLIPFusion.from_preset("tiny", device="cpu").fit("cap", _images(1))
    seconds = stage_seconds(det, _images(1)[0])
    assert list(seconds) == [
        "CLIP image tower",
        "CLIP maps",
        "diffusion pre-processing",
        "VAE encoder",
        "UNet",
        "diffusion maps",
        "fusion",
    ]
    assert all(v >= 0 for v in seconds.values()) and seconds["UNet"] > 0


def test_other_branches_are_timed_whole_and_measure_reports_everything():
    det = fake_detector().fit("cap")
    assert set(stage_seconds(det, _images(1)[0])) == {
        "clip (whole branch)",
        "diffusion (whole branch)",
        "fusion",
    }
    figures = measure(det, _images(3), batch_size=3, repeats=2)
    assert figures["batch_size"] == 3 and figures["images_per_s"] > 0 and figures["latency_s"] > 0
    assert figures["repeats"] == 2 and "peak_vram_gb" not in figures
