"""Reduced precision against float32: the same images' maps and scores, compared by Pearson correlation.

With random weights this checks numerical faithfulness only (the bar is 0.99), never detection quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PEARSON_BAR = 0.99
OUTPUT_KEYS = ("anomaly_map", "clip_L", "clip_V", "diff_L", "diff_V")


def collect_outputs(det: Any, images: Sequence[Any]) -> dict[str, np.ndarray]:
    """Scores and maps of ``images``, one at a time (batch 1, as the latency), as float32 arrays."""
    results = [det.predict([image], batch_size=1)[0] for image in images]
    out = {"score": np.array([r.score for r in results], dtype=np.float32)}
    out["anomaly_map"] = np.stack([r.anomaly_map for r in results]).astype(np.float32)
    for key in OUTPUT_KEYS[1:]:
        out[key] = np.stack([r.maps[key] for r in results]).astype(np.float32)
    return out


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two arrays (flattened); 1.0 when both are the same constant, None when one is
    constant and the other is not (correlation undefined)."""
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    sx, sy = x.std(), y.std()
    if sx == 0 or sy == 0:
        return 1.0 if sx == sy and np.allclose(x, y) else None
    return float(np.corrcoef(x, y)[0, 1])


def faithfulness(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per output: Pearson over all pixels of all images (pooled), the lowest per-image Pearson, the largest
    absolute difference; for the image scores, Pearson over the images (with one image: undefined, so the
    absolute difference is what to read)."""
    n = min(len(reference["score"]), len(other["score"]))
    rows: dict[str, Any] = {}
    for key in ("score", *OUTPUT_KEYS):
        ref, oth = reference[key][:n], other[key][:n]
        row: dict[str, Any] = {
            "pearson": pearson(ref, oth) if (key != "score" or n > 1) else None,
            "max_abs_diff": float(np.abs(ref.astype(np.float64) - oth).max()),
            "reference_range": [float(ref.min()), float(ref.max())],
        }
        if key != "score":
            per_image = [pearson(r, o) for r, o in zip(ref, oth, strict=True)]
            defined = [p for p in per_image if p is not None]
            row["min_per_image"] = min(defined) if defined else None
        value = row["pearson"]
        row["pass"] = None if value is None else value >= PEARSON_BAR
        rows[key] = row
    return rows


def lowest_pearson(rows: dict[str, Any]) -> float | None:
    values = [r["pearson"] for r in rows.values() if r.get("pearson") is not None]
    return min(values) if values else None
