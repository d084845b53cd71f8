"""FLOP counting: the formulas added for CPU attention kernels equal torch's own counts of the unfused
computation, counts split by kernel kind, and the floor they imply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from benchmarks.flops import by_kind, floor_seconds, flop_counter, flop_mapping, mha_flops
from torch.utils.flop_counter import FlopCounterMode


def test_mha_fast_path_formula_equals_the_unfused_count():
    mha = torch.nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 64)
    # grad mode with weights returned: no fast path and no fused attention, plain linears and bmms
    with FlopCounterMode(display=False) as unfused:
        mha(x, x, x, need_weights=True)
    expected = unfused.get_total_flops()
    assert expected > 0
    assert mha_flops((3, 10, 64), (3, 10, 64), (3, 10, 64), 64, 4) == expected
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=flop_mapping()) as fast:
        mha(x, x, x, need_weights=False)
    assert fast.get_total_flops() == expected


def test_cpu_attention_is_counted_like_the_explicit_computation():
    q, k, v = (torch.randn(2, 4, 50, 16) for _ in range(3))
    with FlopCounterMode(display=False) as explicit:
        (q @ k.transpose(-1, -2) / 4).softmax(-1) @ v
    with FlopCounterMode(display=False, custom_mapping=flop_mapping()) as fused:
        F.scaled_dot_product_attention(q, k, v)
    assert explicit.get_total_flops() > 0
    assert fused.get_total_flops() == explicit.get_total_flops()


def test_flops_are_split_into_convolutions_and_matmuls():
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    linear = torch.nn.Linear(32, 64)
    with torch.inference_mode(), flop_counter() as counter:
        conv(torch.randn(1, 8, 10, 10))
        linear(torch.randn(5, 32))
    kinds = by_kind(counter)
    assert kinds == {"conv": 2 * 16 * 8 * 9 * 100, "matmul": 2 * 5 * 32 * 64}


def test_floor_is_each_kind_at_its_own_peak():
    peaks = {"conv": {"float32": 50.0}, "matmul": {"float32": 100.0}}
    flops = {"conv": 50 * 10**9, "matmul": 200 * 10**9}
    assert floor_seconds(flops, peaks, "float32") == pytest.approx(1.0 + 2.0)
    assert floor_seconds({"conv": 0, "matmul": 100 * 10**9}, peaks, "float32") == pytest.approx(1.0)
    assert floor_seconds(flops, peaks, "bfloat16") is None  # no peak measured for that dtype
