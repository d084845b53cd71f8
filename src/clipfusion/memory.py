"""Reference memory banks and nearest-neighbour distances, shared by both branches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nearest_neighbour_distance(
    queries: torch.Tensor, bank: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Cosine distance ``min_m (1 - cos(q, m))`` of every query vector to a memory bank.

    ``queries`` is ``(..., D)`` and ``bank`` is ``(M, D)``; the result has the leading shape of ``queries``.
    Computed in float32 whatever the input dtype (reduced-precision cosines near 1 lose the small
    distances that matter), in chunks of queries so that the ``chunk × M`` similarity matrix stays bounded.
    """
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"memory bank must be a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(f"feature sizes differ: queries {queries.shape[-1]}, bank {bank.shape[-1]}")
    lead = queries.shape[:-1]
    flat = F.normalize(queries.reshape(-1, queries.shape[-1]).float(), dim=-1)
    bank_n = F.normalize(bank.float(), dim=-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_size):
        sim = flat[start : start + chunk_size] @ bank_n.T
        out[start : start + chunk_size] = 1.0 - sim.amax(dim=1)
    return out.reshape(lead)
