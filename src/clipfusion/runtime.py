"""The one place that turns device and dtype names into torch objects."""

from __future__ import annotations

import functools
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
    """Map a dtype name to a torch dtype, refusing float16 on the CPU (slow and inaccurate there)."""
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        if name not in _DTYPES:
            raise ConfigError(f"dtype {name!r} is not one of float32, bfloat16, float16")
        dtype = _DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise ConfigError("dtype float16 is only supported on CUDA; use bfloat16 or float32 on the CPU")
    return dtype


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
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, looked up once (``find_library`` runs a subprocess), or None."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


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
