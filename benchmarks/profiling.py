"""Where the time goes inside the VAE encoder and the UNet: torch's profiler on one batch-1 pass of each.

Operators are grouped by kind: convolutions and matmuls (what the FLOPs are, and what the compute floor
assumes) and everything else (normalisations, activations, additions, copies, layout changes: memory-bound
work the floor does not count, the distance to close).
"""

from __future__ import annotations

from typing import Any

import torch

CONV_OPS = ("convolution", "conv2d")
MATMUL_OPS = ("addmm", "aten::mm", "bmm", "baddbmm", "matmul", "attention", "linear")


def _kind(name: str) -> str:
    if any(op in name for op in CONV_OPS):
        return "conv"
    if any(op in name for op in MATMUL_OPS):
        return "matmul"
    return "other"


def _table(prof: Any, cuda: bool, top: int) -> dict[str, Any]:
    rows = []
    for event in prof.key_averages():
        self_us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if self_us > 0 and event.key.startswith("aten::"):
            rows.append(
                {"op": event.key, "ms": self_us / 1e3, "calls": event.count, "kind": _kind(event.key)}
            )
    rows.sort(key=lambda r: r["ms"], reverse=True)
    total = sum(r["ms"] for r in rows)
    by_kind = {kind: sum(r["ms"] for r in rows if r["kind"] == kind) for kind in ("conv", "matmul", "other")}
    for row in rows:
        row["share"] = row["ms"] / total if total else None
    return {"total_ms": total, "by_kind_ms": by_kind, "top": rows[:top]}


def profile_diffusion(det: Any, query: Any, device: str, *, top: int = 10) -> dict[str, Any]:
    """Operator tables of one VAE encode and one UNet pass (to its early exit) of a fitted detector."""
    from torch.profiler import ProfilerActivity, profile

    diffusion = det.diffusion
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    pixels = diffusion.preprocess([query])
    state = diffusion.config.state_words[0]
    embeddings = diffusion.prompt_embeddings(diffusion.object_name, state)
    z0 = diffusion.encode_latents(pixels)  # warm-up of both, outside the profile
    sample = diffusion.unet_input(z0)
    diffusion.run_unet(sample, embeddings)
    out: dict[str, Any] = {"dtype": str(diffusion.dtype).removeprefix("torch.")}
    with profile(activities=activities) as prof:
        diffusion.encode_latents(pixels)
        if cuda:
            torch.cuda.synchronize()
    out["VAE"] = _table(prof, cuda, top)
    with profile(activities=activities) as prof:
        diffusion.run_unet(sample, embeddings)
        if cuda:
            torch.cuda.synchronize()
    out["UNet"] = _table(prof, cuda, top)
    return out
