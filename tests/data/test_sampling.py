"""Drawing the k normal references of a few-shot run. (All files fabricated in tmp_path.)"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from clipfusion.data import (
    Sample,
    sample_references,
)
from clipfusion.errors import ConfigError, InputError


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"/data/x/train/good/{i:03d}.png"), 0, None, "good", "x") for i in range(n)]


def test_sample_references_is_deterministic_and_ignores_input_order():
    items = _samples(20)
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    first = sample_references(items, 4, seed=0)
    assert first == sample_references(shuffled, 4, seed=0) == sample_references(tuple(items), 4, seed=0)
    assert len(first) == 4 == len(set(first))
    assert [s.image_path for s in first] == sorted(s.image_path for s in first)
    assert first == [items[i] for i in sorted(np.random.default_rng(0).choice(20, 4, replace=False))]
    draws = {tuple(s.image_path.name for s in sample_references(items, 4, seed=seed)) for seed in range(5)}
    assert len(draws) == 5  # seeds 0..4 give five different reference sets
    assert sample_references(items, 20, seed=3) == items


def test_sample_references_limits():
    items = _samples(3)
    with pytest.raises(InputError, match="asked for 4 .* only 3"):
        sample_references(items, 4, seed=0)
    assert sample_references(items, 0, seed=0) == []
    assert sample_references([], 0, seed=0) == []
    with pytest.raises(ConfigError):
        sample_references(items, -1, seed=0)
    with pytest.raises(ConfigError):
        sample_references(items, 1.5, seed=0)  # type: ignore[arg-type]
