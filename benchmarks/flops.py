"""FLOPs by kernel kind, and the compute floor they imply.

:class:`torch.utils.flop_counter.FlopCounterMode` counts matmuls, convolutions and (on CUDA) attention; the
formulas here add the CPU attention kernels it does not know (``_scaled_dot_product_flash_attention_for_cpu``,
the ``nn.MultiheadAttention`` fast path open_clip's towers take), so that attention is not silently left
out on CPUs. Counts are split into ``conv`` and ``matmul`` because the two kernels reach different peaks
(a 3×3 convolution ran at 70–100 % of the matmul rate on the project's machines): the floor of a stage is
``conv FLOPs / conv peak + matmul FLOPs / matmul peak`` at the stage's dtype.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

KINDS = ("conv", "matmul")


def mha_flops(
    query: Any, key: Any, value: Any, embed_dim: int, num_heads: int, *args: Any, **kwargs: Any
) -> int:
    """FLOPs of ``aten._native_multi_head_attention`` (``nn.MultiheadAttention``'s inference fast path, which
    open_clip's towers take): input projections, QKᵀ, attention × V, output projection. Shapes are
    batch-first ``(B, L, E)``."""
    batch, lq = int(query[0]), int(query[-2])
    lk = int(key[-2])
    e = int(embed_dim)
    projections = 2 * batch * e * e * (lq + 2 * lk) + 2 * batch * lq * e * e
    attention = 2 * 2 * batch * lq * lk * e
    return projections + attention


def cpu_sdpa_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of ``aten._scaled_dot_product_flash_attention_for_cpu`` (QKᵀ and attention × V), as torch
    counts its CUDA attention kernels."""
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def flop_mapping() -> dict[Any, Callable[..., int]]:
    """Formulas for kernels ``FlopCounterMode`` does not know, so that CPU attention is counted."""
    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = cpu_sdpa_flops
    if hasattr(aten, "_native_multi_head_attention"):
        mapping[aten._native_multi_head_attention] = mha_flops
    return mapping


@contextlib.contextmanager
def flop_counter() -> Iterator[Any]:
    from torch.utils.flop_counter import FlopCounterMode

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as counter:
            yield counter


def kind_of(op: Any) -> str:
    """``conv`` for convolutions, ``matmul`` for everything else the counter knows (mm, addmm, bmm,
    attention): the peak a kernel's FLOPs are compared with."""
    return "conv" if "convolution" in str(op) else "matmul"


def by_kind(counter: Any) -> dict[str, int]:
    """The counter's FLOPs so far, per kind."""
    out = dict.fromkeys(KINDS, 0)
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        out[kind_of(op)] += int(flops)
    return out


def floor_seconds(
    flops: dict[str, int], peaks: dict[str, Any], dtype: str, *, slowest: bool = False
) -> float | None:
    """Seconds the FLOPs take at the measured peaks of ``dtype`` (None when a peak was not measured); with
    ``slowest``, at the slowest measured kernel of each kind instead: a pessimistic projection of a call."""
    total = 0.0
    for kind in KINDS:
        if flops.get(kind):
            peak = peaks.get(f"{kind}_slowest" if slowest else kind, {}).get(dtype)
            if not peak:
                return None
            total += flops[kind] / (peak * 1e9)
    return total
