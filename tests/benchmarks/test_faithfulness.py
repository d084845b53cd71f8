"""Pearson correlations of reduced-precision outputs against float32."""

import numpy as np
import pytest
from benchmarks.faithfulness import OUTPUT_KEYS, faithfulness, lowest_pearson, pearson


def test_pearson_edge_cases():
    x = np.linspace(0, 1, 20)
    assert pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert pearson(np.zeros(5), np.zeros(5)) == 1.0
    assert pearson(np.zeros(5), x[:5]) is None


def test_faithfulness_rows_and_the_bar():
    rng = np.random.default_rng(0)
    ref = {key: rng.random((2, 8, 8)).astype(np.float32) for key in OUTPUT_KEYS}
    ref["score"] = np.array([0.2, 0.9], np.float32)
    noisy = {key: value + rng.normal(0, 0.5, value.shape).astype(np.float32) for key, value in ref.items()}
    rows = faithfulness(ref, noisy)
    assert set(rows) == {"score", *OUTPUT_KEYS}
    assert rows["anomaly_map"]["pass"] is False  # noise as large as the signal: far below 0.99
    same = faithfulness(ref, ref)
    assert all(row["pass"] for row in same.values()) and lowest_pearson(same) == pytest.approx(1.0)
    one = faithfulness({k: v[:1] for k, v in ref.items()}, {k: v[:1] for k, v in ref.items()})
    assert one["score"]["pearson"] is None and one["score"]["max_abs_diff"] == 0.0  # one image: no r
