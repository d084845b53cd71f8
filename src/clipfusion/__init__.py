"""clipfusion: training-free zero-/few-shot industrial anomaly detection (CLIP meets diffusion)."""

from __future__ import annotations

from clipfusion.calibration import calibrate
from clipfusion.config import CLIPFusionConfig, MapDiffConfig, PatchCLIPConfig
from clipfusion.errors import ClipfusionError
from clipfusion.provenance import __version__
from clipfusion.thresholds import Thresholds

__all__ = [
    "AnomalyResult",
    "CLIPFusion",
    "CLIPFusionConfig",
    "ClipfusionError",
    "DetectorSet",
    "MapDiffConfig",
    "PatchCLIPConfig",
    "SharedModels",
    "Thresholds",
    "__version__",
    "calibrate",
]


def __getattr__(name: str):
    # the detector pulls in torch, open_clip and diffusers; importing the package for its config or data
    # helpers should not pay for that
    if name in ("CLIPFusion", "AnomalyResult"):
        from clipfusion import detector

        return getattr(detector, name)
    if name == "SharedModels":
        from clipfusion.shared import SharedModels

        return SharedModels
    if name == "DetectorSet":
        from clipfusion.detector_set import DetectorSet

        return DetectorSet
    raise AttributeError(f"module 'clipfusion' has no attribute {name!r}")
