"""Devices, dtypes and memory: what the runtime helpers promise."""

from pathlib import Path

import pytest
import torch


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_freed_heap_pages_go_back_to_the_system():
    import gc

    from clipfusion.runtime import _glibc, process_memory, return_freed_memory

    if _glibc() is None:
        pytest.skip("not glibc: nothing to trim")

    def rss_mb() -> float:
        return process_memory()["rss"] / 1e6

    blocks = [torch.ones(16 * 1024) for _ in range(4000)]  # 64 KB each: from the heap, not mmap
    pin = torch.ones(16)  # keeps the heap's top in use, so free() alone cannot shrink it
    high = rss_mb()
    del blocks
    gc.collect()
    return_freed_memory()
    assert rss_mb() < high - 150  # of the 256 MB freed
    del pin


# ---------------------------------------------------------------------------------------------------------
# dtype "auto"


def test_auto_rule_on_every_kind_of_machine():
    from clipfusion.runtime import choose_dtype

    assert choose_dtype("cpu", amx=False, capability="AVX2").dtype == torch.float32  # nothing measured
    assert choose_dtype("cpu", amx=False, capability="AVX512").dtype == torch.float32  # avx512_bf16 alone
    assert choose_dtype("cpu", amx=True, bf16_speed=4.0).dtype == torch.bfloat16
    slow = choose_dtype("cpu", amx=True, bf16_speed=0.8)  # the micro-check overrules the flag
    assert slow.dtype == torch.float32 and "0.80×" in slow.reason
    # by measurement on every CPU: an EPYC with avx512_bf16 and no AMX, an AVX2 one, a tie
    zen4 = choose_dtype("cpu", avx512_bf16=True, capability="AVX512", bf16_speed=2.31)
    assert zen4.dtype == torch.bfloat16 and zen4.reason.endswith("2.31× float32's speed: bfloat16")
    assert "avx512_bf16, no AMX" in zen4.reason
    assert choose_dtype("cpu", capability="AVX2", bf16_speed=0.01).dtype == torch.float32
    assert (
        choose_dtype("cpu", capability="AVX512", bf16_speed=1.05).dtype == torch.float32
    )  # within the noise
    assert choose_dtype("cuda", bf16_native=False, gpu="T4").dtype == torch.float16
    assert choose_dtype("cuda", bf16_native=True, gpu="H200", bf16_speed=0.99).dtype == torch.bfloat16
    assert choose_dtype("cuda", bf16_native=True, gpu="X", bf16_speed=0.7).dtype == torch.float16
    assert choose_dtype("mps").dtype == torch.float32


def test_auto_is_resolved_once_per_process_from_torchs_probes(monkeypatch):
    from clipfusion import runtime

    runtime.auto_dtype_choice.cache_clear()
    calls = []
    monkeypatch.setattr(
        torch.cpu, "get_capabilities", lambda: {"amx_tile": True, "amx_bf16": True, "cpu_name": "Xeon"}
    )
    monkeypatch.setattr(runtime, "measured_speed_ratio", lambda *a, **k: calls.append(a) or 3.5)
    try:
        assert runtime.cpu_features()["amx"] is True
        assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        assert runtime.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
        assert len(calls) == 1  # the micro-check ran once
        assert "AMX" in runtime.auto_dtype_choice(torch.device("cpu")).reason
    finally:
        runtime.auto_dtype_choice.cache_clear()


def test_without_the_public_probe_the_private_one_is_used(monkeypatch):
    from clipfusion import runtime

    monkeypatch.delattr(torch.cpu, "get_capabilities")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_features()["amx"] is True
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert runtime.cpu_features()["amx"] is False


def test_measured_speed_ratio_is_positive():
    from clipfusion.runtime import measured_speed_ratio

    ratio = measured_speed_ratio(torch.float32, torch.float32, torch.device("cpu"), repeats=1)
    assert 0.2 < ratio < 5  # the same dtype against itself: about 1, whatever the noise


def test_a_hopeless_dtype_ends_the_check_after_the_small_probe(monkeypatch):
    from clipfusion import runtime

    sizes = []

    def probe(candidate, baseline, device, size, *, repeats):
        sizes.append(size)
        return 0.01 if candidate == torch.bfloat16 else 1.0

    monkeypatch.setattr(runtime, "_speed_ratio", probe)
    assert runtime.measured_speed_ratio(torch.bfloat16, torch.float32, torch.device("cpu")) == 0.01
    assert len(sizes) == 1  # the large probe never ran
    assert runtime.measured_speed_ratio(torch.float32, torch.float32, torch.device("cpu")) == 1.0
    assert len(sizes) == 3 and sizes[2][0] > sizes[1][0]  # small, then large


def test_auto_measures_on_a_cpu_without_amx(monkeypatch):
    """avx512_bf16 without AMX (AMD EPYC Zen 4): the measurement decides, both ways."""
    from clipfusion import runtime

    monkeypatch.setattr(
        torch.cpu, "get_capabilities", lambda: {"amx_tile": False, "avx512_bf16": True, "cpu_name": "EPYC"}
    )
    for speed, expected in ((2.3, torch.bfloat16), (0.6, torch.float32)):
        runtime.auto_dtype_choice.cache_clear()
        monkeypatch.setattr(runtime, "measured_speed_ratio", lambda *a, s=speed, **k: s)
        try:
            choice = runtime.auto_dtype_choice(torch.device("cpu"))
            assert choice.dtype == expected and f"{speed:.2f}×" in choice.reason
        finally:
            runtime.auto_dtype_choice.cache_clear()


def test_explicit_dtypes_still_work_and_bad_names_are_refused():
    from clipfusion.errors import ConfigError
    from clipfusion.runtime import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="float16 is only supported on CUDA"):
        resolve_dtype("float16", cpu)
    with pytest.raises(ConfigError, match="auto, float32"):
        resolve_dtype("half", cpu)


def test_placement_record_names_what_auto_became():
    from clipfusion.config import load_preset
    from clipfusion.runtime import auto_dtype, dtype_name, resolve_placement

    record = resolve_placement(load_preset("random-full").replace(device="cpu"))
    resolved = dtype_name(auto_dtype("cpu"))
    assert record["clip"] == record["diffusion"] == {"device": "cpu", "dtype": resolved}
    assert record["auto_dtype"].startswith("CPU") and record["auto_dtype"].endswith(resolved)
    explicit = resolve_placement(load_preset("tiny").replace(device="cpu", use_clip=False))
    assert explicit == {"diffusion": {"device": "cpu", "dtype": "float32"}}  # no rule to explain


_HOLE_SCRIPT = """
import sys
import torch
from clipfusion.runtime import map_large_blocks, process_memory, return_freed_memory

def rss_mb():
    return process_memory()["rss"] / 1e6

if sys.argv[1] == "mapped":
    assert map_large_blocks()
torch.ones(6 * 1024 * 1024)  # a freed 24 MB block: glibc's default now serves up to 24 MB from the heap
# a freed heap region below a block still in use (as the text encoders leave behind), trimmed: resident no
# more, but a free hole
blocks = [torch.ones(2 * 1024 * 1024) for _ in range(40)]  # 8 MB each, 320 MB
pin = torch.ones(256 * 1024)  # 1 MB above them
del blocks
return_freed_memory()
before = rss_mb()
for _ in range(3):  # activations of 8 MB: in the hole (resident after free) or mapped and unmapped
    x = torch.ones(2 * 1024 * 1024)
    y = torch.ones(2 * 1024 * 1024) + x
    del x, y
print(rss_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc")
def test_large_blocks_are_mapped_so_freeing_them_lowers_the_resident_set():
    """Under glibc's default an 8 MB tensor is served from the heap once a 32 MB block was freed, and its
    pages stay resident after it is freed; with map_large_blocks they go back at once."""
    import subprocess
    import sys

    from clipfusion.runtime import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")

    def kept_mb(mode: str) -> float:
        run = subprocess.run([sys.executable, "-c", _HOLE_SCRIPT, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return float(run.stdout.strip().splitlines()[-1])

    assert kept_mb("default") > 12  # two 8 MB activations' pages left resident in the heap
    assert kept_mb("mapped") < 4
