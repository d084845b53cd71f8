"""The check of ``auto`` against the faster explicit dtype, including one too slow to interleave."""

from __future__ import annotations

from benchmarks.comparison import Contender, auto_check


def _out(times: dict[str, float]) -> dict:
    return {"latency": [{"regime": "1-shot", "times": {k: {"median_s": v} for k, v in times.items()}}]}


def _contenders(bf16_timed: bool, bf16_floor: float) -> list[Contender]:
    return [
        Contender("clipfusion", "float32", "float32", None, floor_s=5.0),
        Contender("clipfusion", "bfloat16", "bfloat16", None, floor_s=bf16_floor, timed=bf16_timed),
        Contender("clipfusion", "auto", "float32", None, floor_s=5.0),
    ]


def test_auto_within_ten_percent_of_the_faster_dtype():
    times = {"clipfusion float32": 10.0, "clipfusion bfloat16": 12.0, "clipfusion auto": 10.5}
    (row,) = auto_check(_out(times), _contenders(True, 6.0))["rows"]
    assert row["fastest"] == "float32" and row["pass"] is True
    times["clipfusion auto"] = 11.5
    (row,) = auto_check(_out(times), _contenders(True, 6.0))["rows"]
    assert row["pass"] is False
    times.update({"clipfusion bfloat16": 5.0, "clipfusion auto": 10.0})  # auto picked the slower one
    (row,) = auto_check(_out(times), _contenders(True, 6.0))["rows"]
    assert row["fastest"] == "bfloat16" and row["pass"] is False


def test_a_dtype_too_slow_to_interleave_counts_by_its_floor():
    times = {"clipfusion float32": 10.0, "clipfusion auto": 10.2}
    (row,) = auto_check(_out(times), _contenders(False, 400.0))["rows"]
    assert row["fastest"] == "float32" and row["pass"] is True
    # a floor below auto's time proves nothing: the real time could be anywhere above it
    (row,) = auto_check(_out(times), _contenders(False, 2.0))["rows"]
    assert row["fastest"] == "bfloat16" and row["pass"] is None
