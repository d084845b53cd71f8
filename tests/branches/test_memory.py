"""Nearest-neighbour distances to a memory bank: equal to the brute-force definitions, chunked or not,
and float32 whatever the features' dtype."""

import pytest
import torch
import torch.nn.functional as F

from clipfusion.branches.memory import nearest_neighbour_distance


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 7, 16, generator=g), torch.randn(40, 16, generator=g)


def test_cosine_is_one_minus_the_best_cosine(data):
    queries, bank = data
    expected = 1 - (F.normalize(queries, dim=-1) @ F.normalize(bank, dim=-1).T).amax(-1)
    torch.testing.assert_close(nearest_neighbour_distance(queries, bank), expected, atol=1e-6, rtol=0)


def test_euclidean_is_the_distance_to_the_nearest_vector(data):
    queries, bank = data
    expected = torch.cdist(queries.reshape(-1, 16).double(), bank.double()).amin(-1).reshape(3, 7)
    got = nearest_neighbour_distance(queries, bank, distance="euclidean")
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)
    # a query that is in the bank is at distance 0 (not a small negative number under the square root)
    assert nearest_neighbour_distance(bank[:2], bank, distance="euclidean").abs().max() == 0


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_chunking_does_not_change_the_result(data, distance):
    queries, bank = data
    whole = nearest_neighbour_distance(queries, bank, distance=distance)
    chunked = nearest_neighbour_distance(queries, bank, distance=distance, chunk_size=4)
    torch.testing.assert_close(whole, chunked, atol=1e-6, rtol=0)


def test_reduced_precision_inputs_are_measured_in_float32(data):
    queries, bank = data
    got = nearest_neighbour_distance(queries.bfloat16(), bank.bfloat16())
    assert got.dtype == torch.float32


def test_bad_banks_and_distances_are_refused(data):
    queries, bank = data
    with pytest.raises(ValueError, match="distance must be one of"):
        nearest_neighbour_distance(queries, bank, distance="manhattan")
    with pytest.raises(ValueError, match="non-empty"):
        nearest_neighbour_distance(queries, bank[:0])
    with pytest.raises(ValueError, match="feature sizes differ"):
        nearest_neighbour_distance(queries, bank[:, :8])


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
