"""Devices, dtypes and memory: what the runtime helpers promise."""

from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_freed_heap_pages_go_back_to_the_system():
    import gc

    from clipfusion.runtime import _malloc_trim, return_freed_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")

    def rss_mb() -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS"))
        return int(line.split()[1]) / 1e3

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each: from the heap, not mmap
    pin = torch.ones(16)  # keeps the heap's top in use, so free() alone cannot shrink it
    high = rss_mb()
    del blocks
    gc.collect()
    return_freed_memory()
    assert rss_mb() < high - 150  # of the 256 MB freed
    del pin
