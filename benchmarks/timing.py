"""Timing on a shared machine: calls interleaved round by round, medians, and the other processes' load.

The contenders of a comparison alternate call by call (:func:`time_interleaved`): on the 2-core development
VMs the same call drifted by tens of percent over minutes, so a drift must hit every contender alike rather
than whichever block happened to run during it. :class:`CpuMonitor` records how much of the machine other
processes took meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], Any], *, warmup: int, repeats: int, device: str = "cpu") -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones, synchronised on CUDA."""
    return time_interleaved({"f": lambda _i: fn()}, warmup=warmup, repeats=repeats, device=device)["f"]


def time_interleaved(
    fns: dict[str, Callable[[int], Any]], *, warmup: int, repeats: int, device: str = "cpu"
) -> dict[str, list[float]]:
    """Time several functions round-robin, one call of each per round, each given the round's index (so
    that every contender gets the same input in a round). A burst of load from another process then slows
    every contender alike instead of whichever happened to run during it. Returns the timed rounds' seconds
    per function (the warm-up rounds are left out)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn(i)
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


class CpuMonitor:
    """How busy the machine was *because of other processes* during a section.

    ``other_cpu_share`` = (busy jiffies of the whole machine − this process's and its waited-for children's)
    / all jiffies: 0 on a quiet machine, 0.5 when another process kept one of two cores busy. The 1-minute
    load average is sampled every few seconds as well. Both are what a reader needs to judge the noise.
    """

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._loads: list[float] = []
        self._thread: threading.Thread | None = None
        self._start: tuple[int, int, int] | None = None
        self._wall = 0.0

    @staticmethod
    def _jiffies() -> tuple[int, int, int]:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
            busy = user + nice + system + irq + softirq + steal
            stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
            own = sum(int(v) for v in stat[11:15])  # utime stime cutime cstime
            return busy, busy + idle + iowait, own
        except (OSError, ValueError, IndexError):
            return 0, 0, 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self._loads.append(os.getloadavg()[0])

    def __enter__(self) -> CpuMonitor:
        self._start = self._jiffies()
        self._wall = time.perf_counter()
        with contextlib.suppress(OSError):
            self._loads.append(os.getloadavg()[0])
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            self._loads.append(os.getloadavg()[0])
        end = self._jiffies()
        assert self._start is not None
        busy, total, own = (e - s for e, s in zip(end, self._start, strict=True))
        self.result = {
            "wall_s": time.perf_counter() - self._wall,
            "other_cpu_share": max(0.0, (busy - own) / total) if total > 0 else None,
            "load_max": max(self._loads) if self._loads else None,
            "load_mean": statistics.fmean(self._loads) if self._loads else None,
        }
