"""What the server tests share: one fitted tiny detector per session (fitting is the slow part) and its
query images. The servers themselves are in ``tests/serving.py``; every one listens on 127.0.0.1 only, and
every load loop is bounded in count and time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "fastapi", reason="the server tests need the serve extra (pip install 'clipfusion[serve]')"
)
pytest.importorskip("uvicorn", reason="the server tests need the serve extra")
pytest.importorskip("httpx", reason="the server tests need httpx")

from fabricate import save_image


@dataclass
class Fitted:
    """Two fitted folders of one tiny 1-shot fit (with and without thresholds), query images, and what the
    fitted detector itself predicts for them (the reference the server must reproduce)."""

    with_thresholds: Path
    without_thresholds: Path
    queries: list[Path]
    expected: list  # AnomalyResult per query, from CLIPFusion.predict on the files
    thresholds: object


def _pattern(seed: int, size: int = 96) -> np.ndarray:
    """A smooth texture with a bright blob (seeded): a plausible photo for the tiny models."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = 110 + 40 * np.sin(6 * x + seed) * np.cos(5 * y)
    cy, cx = rng.uniform(0.25, 0.75, 2)
    blob = 90 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.01) * (seed % 2)
    rgb = np.stack([base + blob, base * 0.9 + blob, base * 0.8], -1) + rng.normal(0, 6, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> Fitted:
    from clipfusion.calibration import calibrate
    from clipfusion.detector import CLIPFusion

    root = tmp_path_factory.mktemp("serve-fitted")
    files = [save_image(root / "images" / f"part_{i}.png", _pattern(i)) for i in range(8)]
    refs, normals, queries = files[:1], files[1:4], files[4:8]
    det = CLIPFusion.from_preset("tiny").fit("bottle cap", refs)
    det.release_text_encoders()
    thresholds = calibrate(det, normals, 0.9)
    det.save(root / "with_thresholds", thresholds)
    det.thresholds = None
    det.save(root / "without_thresholds")
    expected = det.predict(queries)  # one batch (tiny's default batch size is 4)
    return Fitted(root / "with_thresholds", root / "without_thresholds", queries, expected, thresholds)
