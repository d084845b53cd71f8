"""The one place that decides devices and dtypes, and measures the process's memory.

``dtype = "auto"`` (the default of the ``paper`` and ``random-full`` presets) is resolved here, per device,
once per process:

* **CPU**: ``bfloat16`` wherever a micro-benchmark (a matmul and a 3×3 convolution, the two kernels the
  models spend their time in; a fraction of a second) finds it at least :data:`CPU_BF16_MIN_SPEEDUP` times as
  fast as float32 on this processor, whatever made it so — Intel's AMX tiles (≈ 5× measured), AVX-512 with
  avx512_bf16 dot products (2.3× on an AMD EPYC of Zen 4), or anything else; otherwise ``float32``. The
  features are recorded beside the measured ratio, never trusted alone: an avx512_bf16 Xeon measured bfloat16
  at half float32's speed, an AVX2 EPYC at a hundredth (where a small first probe ends the check at once).
* **CUDA**: ``float16``, or ``bfloat16`` where the GPU supports it natively and the same micro-benchmark
  finds it at least as fast as float16 (within 5 %, the check's timing noise; bfloat16's wider range cannot
  overflow where float16 can).
* any other device: ``float32``.

The features come from torch's own probes (``torch.cpu.get_capabilities``, cpuinfo underneath; the private
``torch.cpu._is_amx_tile_supported`` where that is missing), never from parsing ``/proc/cpuinfo`` here.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch

from clipfusion.errors import ConfigError

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO = "auto"
#: a reduced precision is chosen on a GPU when its measured speed is at least this fraction of the other's
_GPU_SPEED_TOLERANCE = 0.95
#: bfloat16 is chosen on a CPU when the micro-benchmark finds it at least this much faster than float32 (a
#: margin over the check's noise: a dtype that only ties is not worth its rounding)
CPU_BF16_MIN_SPEEDUP = 1.15


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when present, otherwise the CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device (try 'cpu', 'cuda' or 'cuda:1')") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for, but this machine has no usable CUDA device")
    return device


def resolve_dtype(name: str | torch.dtype, device: torch.device) -> torch.dtype:
    """Map a dtype name to a torch dtype: ``auto`` by :func:`auto_dtype`; float16 is refused on the CPU
    (slow and inaccurate there)."""
    if isinstance(name, torch.dtype):
        dtype = name
    elif name == AUTO:
        return auto_dtype(device)
    else:
        if name not in _DTYPES:
            raise ConfigError(f"dtype {name!r} is not one of auto, float32, bfloat16, float16")
        dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("dtype float16 is only supported on CUDA; use bfloat16 or float32 on the CPU")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``: the name configurations and records use."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------------------
# dtype "auto"


@dataclass(frozen=True)
class DtypeChoice:
    """What ``dtype = "auto"`` resolved to on one device, and why (recorded with every run)."""

    dtype: torch.dtype
    reason: str


def cpu_features() -> dict[str, Any]:
    """The CPU's vector and matrix features that decide the dtype, from torch's probes (cpuinfo).

    ``capability``: the kernels torch dispatches to (``AVX2``, ``AVX512``, ...); ``amx``: Intel AMX with
    bfloat16 (``amx_bf16`` and ``amx_tile``); ``avx512_bf16``: bfloat16 dot products without a matrix unit.
    """
    capabilities: dict[str, Any] = {}
    with contextlib.suppress(AttributeError, RuntimeError):  # public since torch 2.8
        capabilities = dict(torch.cpu.get_capabilities())
    if "amx_tile" not in capabilities:  # older torch: the private probes of the same cpuinfo data
        for key, probe in (
            ("amx_tile", "_is_amx_tile_supported"),
            ("avx512_bf16", "_is_avx512_bf16_supported"),
        ):
            with contextlib.suppress(Exception):  # private probes: any failure means "not known"
                capabilities[key] = bool(getattr(torch.cpu, probe)())
    capability = "unknown"
    with contextlib.suppress(AttributeError, RuntimeError):
        capability = str(torch.backends.cpu.get_cpu_capability())
    # AMX is a tile unit plus its bfloat16 instructions; the older probes only see the tiles, which every
    # processor that has them pairs with amx_bf16 (Sapphire Rapids and later)
    amx = bool(capabilities.get("amx_tile", False)) and bool(capabilities.get("amx_bf16", True))
    return {
        "capability": capability,
        "amx": amx,
        "avx512_bf16": bool(capabilities.get("avx512_bf16", False)),
        "name": str(capabilities.get("cpu_name", "")),
    }


def auto_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype ``"auto"`` means on ``device`` (see the module docstring); decided once per process."""
    return auto_dtype_choice(resolve_device(device)).dtype


@functools.cache
def auto_dtype_choice(device: torch.device) -> DtypeChoice:
    """:func:`auto_dtype` with its reason; the micro-benchmark, where one is needed, runs once per device."""
    if device.type == "cpu":
        features = cpu_features()
        speed = measured_speed_ratio(torch.bfloat16, torch.float32, device)
        return choose_dtype(
            "cpu",
            amx=features["amx"],
            avx512_bf16=features["avx512_bf16"],
            capability=features["capability"],
            bf16_speed=speed,
        )
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        with torch.cuda.device(index):
            if not torch.cuda.is_bf16_supported(including_emulation=False):
                return choose_dtype("cuda", bf16_native=False, gpu=gpu)
            speed = measured_speed_ratio(torch.bfloat16, torch.float16, device)
        return choose_dtype("cuda", bf16_native=True, gpu=gpu, bf16_speed=speed)
    return choose_dtype(device.type)


def choose_dtype(
    device_type: str,
    *,
    amx: bool = False,
    avx512_bf16: bool = False,
    capability: str = "",
    bf16_native: bool = False,
    gpu: str = "",
    bf16_speed: float | None = None,
) -> DtypeChoice:
    """The rule of ``"auto"`` given the facts (the probes and the micro-benchmark's speed ratio of bfloat16
    to the alternative: float32 on a CPU, float16 on CUDA); pure, so that every branch of it is testable.
    On a CPU the measured ratio decides; without one (nothing measured), float32."""
    if device_type == "cpu":
        features = [capability or "unknown"] + (["avx512_bf16"] if avx512_bf16 else [])
        features.append("AMX" if amx else "no AMX")
        where = f"CPU ({', '.join(features)})"
        if bf16_speed is None:
            return DtypeChoice(torch.float32, f"{where}, bfloat16 not measured: float32")
        if bf16_speed >= CPU_BF16_MIN_SPEEDUP:
            return DtypeChoice(
                torch.bfloat16, f"{where}, bfloat16 measured {bf16_speed:.2f}× float32's speed: bfloat16"
            )
        return DtypeChoice(
            torch.float32, f"{where}, bfloat16 measured {bf16_speed:.2f}× float32's speed here: float32"
        )
    if device_type == "cuda":
        where = f"CUDA {gpu}".rstrip()
        if not bf16_native:
            return DtypeChoice(torch.float16, f"{where} without native bfloat16: float16")
        if bf16_speed is not None and bf16_speed >= _GPU_SPEED_TOLERANCE:
            return DtypeChoice(
                torch.bfloat16, f"{where}: bfloat16 (measured {bf16_speed:.2f}× float16's speed)"
            )
        return DtypeChoice(
            torch.float16, f"{where}: float16 (bfloat16 measured {bf16_speed or 0:.2f}× its speed)"
        )
    return DtypeChoice(torch.float32, f"{device_type}: float32 (no reduced-precision rule for this device)")


def measured_speed_ratio(
    candidate: torch.dtype,
    baseline: torch.dtype,
    device: torch.device,
    *,
    repeats: int = 3,
    hopeless: float = 0.5,
) -> float:
    """Speed of ``candidate`` relative to ``baseline`` (2.0: twice as fast) on the two kernels the models
    spend their time in: a square matmul and a channels-last 3×3 convolution, best of ``repeats`` after a
    warm-up. On a CPU a small probe runs first, and a ratio under ``hopeless`` ends the check there (a
    processor without any bfloat16 support runs it a hundred times slower: no need to wait for the large
    one). A fraction of a second on a CPU, milliseconds on a GPU."""
    cuda = device.type == "cuda"
    if not cuda:
        small = _speed_ratio(candidate, baseline, device, (512, 64, 32), repeats=repeats)
        if small < hopeless:
            return small
    return _speed_ratio(
        candidate, baseline, device, (4096, 256, 128) if cuda else (1024, 128, 64), repeats=repeats
    )


def _speed_ratio(
    candidate: torch.dtype,
    baseline: torch.dtype,
    device: torch.device,
    sizes: tuple[int, int, int],
    *,
    repeats: int,
) -> float:
    import time

    cuda = device.type == "cuda"
    n, channels, side = sizes
    generator = torch.Generator("cpu").manual_seed(0)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    x = torch.randn(1, channels, side, side, generator=generator)
    w = torch.randn(channels, channels, 3, 3, generator=generator) / (3 * channels)

    def best(dtype: torch.dtype) -> float:
        ad, bd = a.to(device, dtype), b.to(device, dtype)
        xd = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
        wd = w.to(device, dtype).contiguous(memory_format=torch.channels_last)
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                ad @ bd
                torch.nn.functional.conv2d(xd, wd, padding=1)
                if cuda:
                    torch.cuda.synchronize(device)
                if i:  # the first call is the warm-up (kernel selection, weight packing)
                    times.append(time.perf_counter() - start)
        return min(times)

    return best(baseline) / best(candidate)


def resolve_placement(config: Any) -> dict[str, Any]:
    """Where each branch in use of a :class:`~clipfusion.config.CLIPFusionConfig` runs on this machine,
    with ``"auto"`` resolved: ``{"clip": {"device": "cpu", "dtype": "float32"}, "diffusion": {...},
    "auto_dtype": "CPU without AMX (AVX2): float32"}`` (the last only when a branch asked for ``auto``).
    What ``clipfusion config`` shows and every run's ``config.json`` and ``results.json`` record."""
    record: dict[str, Any] = {}
    reasons: list[str] = []
    clip, diffusion = config.branch_configs()
    for name, section, used in (
        ("clip", clip, config.use_clip),
        ("diffusion", diffusion, config.use_diffusion),
    ):
        if not used:
            continue
        device = resolve_device(section.device)
        record[name] = {"device": str(device), "dtype": dtype_name(resolve_dtype(section.dtype, device))}
        if section.dtype == AUTO:
            reason = auto_dtype_choice(device).reason
            if reason not in reasons:
                reasons.append(reason)
    if reasons:
        record["auto_dtype"] = "; ".join(reasons)
    return record


def free_device_memory() -> None:
    """Collect dropped tensors and hand the CUDA caching allocator's unused blocks back (after an
    out-of-memory error, or between models), so the next allocation sees the memory as free."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def return_freed_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``).

    Freed tensors below glibc's mmap threshold stay in the process heap, so dropping the text encoders or
    casting float32 weights to bfloat16 barely lowers the resident set by itself (measured on random-full,
    bfloat16: 0.16 GB after dropping the text encoders, 1.3 GB with this call). On a factory PC the resident
    set is what competes with the camera software. A no-op (False) where the C library is not glibc.
    """
    import gc

    gc.collect()
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


#: glibc's mallopt parameter number for the mmap threshold (malloc.h)
_M_MMAP_THRESHOLD = -3
#: blocks of this size or more get their own mapping (see map_large_blocks)
LARGE_BLOCK_BYTES = 4 << 20


@functools.cache
def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have glibc give every allocation of ``threshold`` bytes or more its own mapping, returned to the
    system the moment it is freed (``mallopt(M_MMAP_THRESHOLD)``); once per process.

    glibc's default raises that threshold to 32 MB as blocks are freed, and serves a request from any free
    hole in the heap before mapping fresh memory. Once the text encoders (1.8 GB of tensors) are freed, the
    heap is full of such holes: the VAE's activations then land in them, and every page they touched stays
    resident until a trim. Measured on random-full float32 (the benchmark's memory worker, with the lean VAE
    pass): the inference peak above the loaded models fell from 0.57 to 0.43 GB, at the same speed. The
    setting is process-wide and only lowers the threshold (glibc starts at 128 KB);
    :class:`~clipfusion.detector.CLIPFusion` applies it before loading its models. A no-op (False) where
    the C library is not glibc.
    """
    libc = _glibc()
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold))) if libc is not None else False


@functools.cache
def _glibc() -> Any:
    """The C library with glibc's ``malloc_trim`` and ``mallopt``, looked up once (``find_library`` runs a
    subprocess), or None (musl, macOS, Windows)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    except (OSError, AttributeError):
        return None
    return libc


def process_memory() -> dict[str, int]:
    """This process's resident set now (``rss``) and its peak (``peak_rss``), in bytes, from
    ``/proc/self/status``; empty where there is no such file (not Linux)."""
    import contextlib
    from pathlib import Path

    names = {"VmRSS": "rss", "VmHWM": "peak_rss"}
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in names:
                values[names[key]] = int(line.split()[1]) * 1024
    return values


def reset_peak_memory() -> bool:
    """Reset the kernel's peak-RSS mark (``VmHWM``) to the current RSS, so the next peak measures one phase;
    False where that is not allowed."""
    from pathlib import Path

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
