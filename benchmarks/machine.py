"""The machine the figures belong to: CPU model and features (AMX or not), versions, and measured peaks.

Every figure of RESULTS.md is printed beside :func:`flags_line` (e.g. ``AMD EPYC, 2 cores, AVX2, no AMX``):
on this project's machines the same code ran 4× faster in bfloat16 on a CPU with AMX and 100× slower on one
without any bfloat16 instructions. The features come from the kernel's ``/proc/cpuinfo`` flags (what
``lscpu`` prints) and from torch's own probe (``torch.cpu.get_capabilities``, via
:func:`clipfusion.runtime.cpu_features`), which decides the dtype ``auto``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import GB
from benchmarks.timing import time_calls

#: the /proc/cpuinfo flags (lscpu) that matter for these models' kernels
CPUINFO_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    with contextlib.suppress(AttributeError, RuntimeError, KeyError):
        name = str(torch.cpu.get_capabilities()["cpu_name"]).strip()
        if name:
            return name
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpuinfo_flags() -> list[str]:
    """The relevant flags as the kernel lists them (what ``lscpu`` shows)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in CPUINFO_FLAGS if f in flags]
    return []


def torch_capabilities() -> dict[str, Any]:
    """``torch.cpu.get_capabilities()`` (cpuinfo), the feature entries that are set."""
    with contextlib.suppress(AttributeError, RuntimeError):
        caps = dict(torch.cpu.get_capabilities())
        return {k: v for k, v in caps.items() if v and k not in ("cpu_name",)}
    return {}


def version(module: str) -> str:
    try:
        from importlib.metadata import version as _version

        return _version(module)
    except Exception:  # a missing package is reported, not fatal
        return "not installed"


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "src", "benchmarks"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return rev.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: str) -> dict[str, Any]:
    """CPU, its features and what ``auto`` makes of them, cores, memory, versions: what the figures
    depend on."""
    from clipfusion.runtime import auto_dtype_choice, cpu_features, resolve_device

    features = cpu_features()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpuinfo_flags": cpuinfo_flags(),
        "torch_cpu_capability": features["capability"],
        "torch_capabilities": torch_capabilities(),
        "amx": features["amx"],
        "auto_dtype": auto_dtype_choice(resolve_device(device)).reason,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            name: version(name)
            for name in ("torch", "diffusers", "open_clip_torch", "anomalib", "clipfusion")
        },
        "git": git_revision(),
    }
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = int(line.split()[1]) * 1024 / GB
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = props.name
        info["gpu_memory_gb"] = props.total_memory / GB
        info["cuda"] = torch.version.cuda
    return info


def flags_line(machine: dict[str, Any]) -> str:
    """``AMD EPYC, 2 cores, AVX2, no AMX``: printed beside every figure."""
    if machine.get("gpu"):
        return f"{machine['gpu']} (CUDA {machine.get('cuda')})"
    amx = "AMX" if machine.get("amx") else "no AMX"
    bf16 = ", avx512_bf16" if "avx512_bf16" in machine.get("cpuinfo_flags", []) else ""
    return (
        f"{machine.get('cpu', '?')}, {machine.get('usable_cores', '?')} cores, "
        f"{machine.get('torch_cpu_capability', '?')}{bf16}, {amx}"
    )


def measure_bandwidth(device: str, *, megabytes: int = 256, repeats: int = 5) -> float:
    """GB/s of a large tensor copy (read + write), best of ``repeats``: the memory-bound reference that the
    normalisations and activations of the VAE and UNet live by."""
    n = megabytes * 2**20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = min(time_calls(lambda: dst.copy_(src), warmup=1, repeats=repeats, device=device))
    return 2 * n * 4 / best / 1e9


def speed_probe(device: str, *, matmul_n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """A few seconds of fp32 matmul and memory copy, run at the start and the end of the timed sections:
    the machine's own speed can drift (shared hosts), and this shows by how much during the run."""
    dev = torch.device(device)
    a = torch.randn(matmul_n, matmul_n, device=dev)
    b = torch.randn(matmul_n, matmul_n, device=dev)
    with torch.inference_mode():
        best = min(time_calls(lambda: a @ b, warmup=1, repeats=repeats, device=device))
    return {"matmul_fp32_gflops": 2 * matmul_n**3 / best / 1e9, "copy_gb_s": measure_bandwidth(device)}


def _best_rate(fn: Any, flops: float, *, repeats: int, device: str, slow_s: float) -> float:
    """GFLOP/s of the best of ``repeats`` calls after one warm-up; a kernel whose warm-up took longer than
    ``slow_s`` (a dtype without hardware support) is timed once more only."""
    first = time_calls(fn, warmup=0, repeats=1, device=device)[0]
    more = 1 if first > slow_s else repeats
    best = min(time_calls(fn, warmup=0, repeats=more, device=device))
    return flops / best / 1e9


def measure_peaks(
    device: str,
    dtypes: Sequence[str],
    *,
    matmul_n: int,
    conv_shapes: Sequence[tuple[int, int]],
    conv_batch: int = 1,
    repeats: int = 5,
    slow_s: float = 2.0,
) -> dict[str, Any]:
    """The compute floor's references, per dtype: GFLOP/s of a square matmul (the better of ``mm`` and a
    linear layer), and of channels-last 3×3 convolutions at the channel counts and sides of the VAE and UNet
    (the best of them is the convolution peak). Best of ``repeats``, not median: a peak is what the
    hardware can do; noise only slows a run. The slowest kernel of each kind is kept too: where a dtype has
    no hardware support its rate varies tenfold between shapes, and the slowest bounds how long a call may
    take (whether a contender can be timed at all)."""
    from clipfusion.runtime import resolve_dtype

    dev = torch.device(device)
    peaks: dict[str, Any] = {
        "matmul": {},
        "matmul_kernels": {},
        "matmul_slowest": {},
        "conv": {},
        "conv_shapes": {},
        "conv_slowest": {},
    }
    generator = torch.Generator("cpu").manual_seed(0)
    for name in dtypes:
        dtype = resolve_dtype(name, dev)
        a = torch.randn(matmul_n, matmul_n, generator=generator).to(dev, dtype)
        b = torch.randn(matmul_n, matmul_n, generator=generator).to(dev, dtype)
        bias = torch.randn(matmul_n, generator=generator).to(dev, dtype)
        flops = 2 * matmul_n**3
        with torch.inference_mode():
            # the models' matmuls are mostly linear layers (addmm), which some builds run through another
            # kernel than a bare mm (bfloat16 without AVX-512: oneDNN for one, a reference loop for the other)
            rates = {
                "mm": _best_rate(
                    lambda a=a, b=b: a @ b, flops, repeats=repeats, device=device, slow_s=slow_s
                ),
                "linear": _best_rate(
                    lambda a=a, b=b, bias=bias: torch.nn.functional.linear(a, b, bias),
                    flops,
                    repeats=repeats,
                    device=device,
                    slow_s=slow_s,
                ),
            }
        peaks["matmul_kernels"][name] = rates
        peaks["matmul"][name] = max(rates.values())
        peaks["matmul_slowest"][name] = min(rates.values())
        rates = {}
        for channels, side in conv_shapes:
            conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dev, dtype)
            conv = conv.to(memory_format=torch.channels_last).eval()
            x = torch.randn(conv_batch, channels, side, side, generator=generator).to(dev, dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            flops = 2 * conv_batch * channels**2 * 9 * side**2
            with torch.inference_mode():
                rates[f"{channels}ch {side}²"] = _best_rate(
                    lambda conv=conv, x=x: conv(x), flops, repeats=repeats, device=device, slow_s=slow_s
                )
        peaks["conv_shapes"][name] = rates
        peaks["conv"][name] = max(rates.values())
        peaks["conv_slowest"][name] = min(rates.values())
    return peaks
