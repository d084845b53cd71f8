"""Drawing the k normal reference images of a few-shot run."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from clipfusion.data._common import Sample
from clipfusion.errors import ConfigError, InputError


def sample_references(items: Iterable[Sample], k: int, seed: int) -> list[Sample]:
    """Choose ``k`` distinct items, reproducibly.

    The choice depends only on the set of paths, ``k`` and ``seed``: items are sorted by path first (so the
    order a folder listing or a CSV happens to give does not matter), then ``numpy.random.default_rng(seed)``
    picks ``k`` without replacement. The chosen items come back in path order, so that recorded reference
    lists compare equal across runs and machines.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ConfigError(f"k (number of reference images) must be an integer; got {k!r}")
    if k < 0:
        raise ConfigError(f"k (number of reference images) must be >= 0; got {k}")
    pool = sorted(items, key=lambda s: str(s.image_path))
    if k > len(pool):
        raise InputError(f"asked for {k} reference images but only {len(pool)} are available")
    if k == 0:
        return []
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(pool), size=int(k), replace=False))
    return [pool[i] for i in chosen]
