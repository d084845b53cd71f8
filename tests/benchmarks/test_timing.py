"""Interleaved timing gives every contender the same rounds."""

from benchmarks.timing import CpuMonitor, median, time_interleaved


def test_time_interleaved_gives_each_contender_the_same_round():
    order: list[tuple[str, int]] = []
    times = time_interleaved(
        {"a": lambda i: order.append(("a", i)), "b": lambda i: order.append(("b", i))},
        warmup=1,
        repeats=3,
        device="cpu",
    )
    assert order == [(name, i) for i in range(4) for name in ("a", "b")]  # round by round, a then b
    assert [len(v) for v in times.values()] == [3, 3]  # the warm-up round is not kept
    assert median([3.0, 1.0, 2.0]) == 2.0


def test_cpu_monitor_reports_the_other_processes_share():
    with CpuMonitor(interval=0.05) as monitor:
        sum(i * i for i in range(200_000))
    share = monitor.result["other_cpu_share"]
    assert monitor.result["wall_s"] > 0
    assert share is None or 0.0 <= share <= 1.0
