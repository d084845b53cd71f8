"""Nearest-neighbour distances to a memory bank: float32 whatever the features' dtype."""

import pytest
import torch

from clipfusion.branches.memory import nearest_neighbour_distance


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_distances_are_float32_for_reduced_precision_features(distance):
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 5, 16, generator=generator).to(torch.bfloat16)
    bank = torch.randn(40, 16, generator=generator).to(torch.bfloat16)
    out = nearest_neighbour_distance(queries, bank, distance=distance, chunk_size=4)
    assert out.dtype == torch.float32 and out.shape == (3, 5)
    # computed on the float32 upcast of the same features (not in bfloat16, whose cosines near 1 are coarse)
    reference = nearest_neighbour_distance(queries.float(), bank.float(), distance=distance)
    torch.testing.assert_close(out, reference)
    exact = torch.cdist(queries.float().reshape(-1, 16), bank.float()).amin(dim=1).reshape(3, 5)
    if distance == "euclidean":
        torch.testing.assert_close(out, exact, atol=1e-4, rtol=1e-4)
