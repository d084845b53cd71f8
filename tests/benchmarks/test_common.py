"""Twins of a built detector: other branch objects on the same modules, never a cast of shared weights."""

from __future__ import annotations

import pytest
import torch
from benchmarks.common import branch_dtypes, dtype_label, twin_detector
from PIL import Image


@pytest.fixture(scope="module")
def tiny():
    from clipfusion.detector import CLIPFusion

    return CLIPFusion.from_preset("tiny", device="cpu")


def test_twin_shares_the_modules_and_has_its_own_configuration(tiny):
    from clipfusion.runtime import auto_dtype

    # a twin in a dtype of its own words that resolves to the shared weights' (auto is bfloat16 on a CPU
    # that measures it faster: then the twin names float32 itself)
    same = "auto" if auto_dtype("cpu") == torch.float32 else "float32"
    twin = twin_detector(tiny, dtype=same, **{"diffusion.n_noise": 2})
    assert twin.clip is not tiny.clip and twin.diffusion is not tiny.diffusion
    assert twin.clip.model is tiny.clip.model and twin.diffusion.unet is tiny.diffusion.unet
    assert twin.config.dtype == same and twin.diffusion.config.n_noise == 2
    assert tiny.config.dtype == "float32" and tiny.diffusion.config.n_noise == 1  # the original is untouched
    images = [Image.new("RGB", (64, 64), (90, 120, 150))]
    a = twin_detector(tiny).fit("cap", images).predict(images)[0]
    b = twin_detector(tiny).fit("cap", images).predict(images)[0]
    assert (a.anomaly_map == b.anomaly_map).all()
    assert dtype_label(tiny) == "fp32" and branch_dtypes(tiny) == {"clip": "float32", "diffusion": "float32"}


def test_twin_in_another_dtype_is_refused(tiny):
    with pytest.raises(ValueError, match="cannot share"):
        twin_detector(tiny, dtype="bfloat16")
    assert next(tiny.diffusion.unet.parameters()).dtype == torch.float32
