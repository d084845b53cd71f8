"""Reference memory banks and nearest-neighbour distances, shared by both branches (clip_V, diff_V)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clipfusion.config import DISTANCES


def nearest_neighbour_distance(
    queries: torch.Tensor, bank: torch.Tensor, *, distance: str = "cosine", chunk_size: int = 4096
) -> torch.Tensor:
    """Distance of every query vector to its nearest vector of a memory bank.

    ``cosine``: ``min_m (1 - cos(q, m))`` (in [0, 2]); ``euclidean``: ``min_m ||q - m||``. ``queries`` is
    ``(..., D)`` and ``bank`` is ``(M, D)``; the result has the leading shape of ``queries``. Computed in
    float32 whatever the input dtype (reduced-precision cosines near 1 lose the small distances that
    matter), in chunks of queries so that the ``chunk × M`` similarity matrix stays bounded.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {', '.join(DISTANCES)}, got {distance!r}")
    if bank.ndim != 2 or bank.shape[0] == 0:
        raise ValueError(f"memory bank must be a non-empty (M, D) tensor, got shape {tuple(bank.shape)}")
    if queries.shape[-1] != bank.shape[-1]:
        raise ValueError(f"feature sizes differ: queries {queries.shape[-1]}, bank {bank.shape[-1]}")
    lead = queries.shape[:-1]
    flat = queries.reshape(-1, queries.shape[-1]).float()
    bank = bank.float().to(flat.device)
    if distance == "cosine":
        flat, bank = F.normalize(flat, dim=-1), F.normalize(bank, dim=-1)
    else:
        bank_sq = bank.square().sum(dim=1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=flat.device)
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size]
        sim = chunk @ bank.T
        if distance == "cosine":
            out[start : start + chunk_size] = 1.0 - sim.amax(dim=1)
        else:
            # the nearest vector by ||m||² - 2 q·m (||q||² is the same for every m), then its distance
            # computed directly: the expanded form loses small distances to cancellation (0.003 for a match)
            nearest = (bank_sq - 2.0 * sim).argmin(dim=1)
            out[start : start + chunk_size] = (chunk - bank[nearest]).norm(dim=1)
    return out.reshape(lead)
