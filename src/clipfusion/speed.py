"""How fast and how large a configuration is on the machine at hand (``clipfusion bench``).

Measures a built detector: per-stage latency at batch 1 (each branch's public steps run one by one, the same
steps ``predict`` runs), whole-prediction latency at batch 1, images per second at a batch size, and the
peak memory of inference (resident set; on CUDA the allocator's peak). No comparison with other systems:
that harness lives in the repository's ``benchmarks/`` folder.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from clipfusion.runtime import process_memory, reset_peak_memory


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def stage_seconds(detector: Any, image: Image.Image) -> dict[str, float]:
    """Seconds per stage of one image: the CLIP image tower and its maps, the diffusion pre-processing, the
    VAE encoder, the UNet (to its early exit, every state word and noise draw: :meth:`MapDiff.passes`), the
    diffusion maps, and the fusion. Branches other than PatchCLIP and MapDiff are timed whole."""
    from clipfusion.branches.mapdiff import MapDiff
    from clipfusion.branches.patchclip import PatchCLIP

    seconds: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    for branch in detector.branches:
        device = getattr(branch, "device", torch.device("cpu"))
        if isinstance(branch, PatchCLIP):
            text = branch.text_features(branch.object_name)
            with torch.inference_mode():
                seconds["CLIP image tower"], features = _timed(lambda b=branch: b.features([image]), device)
                seconds["CLIP maps"], maps = _timed(
                    lambda b=branch, f=features, t=text: b.maps_from_features(f, t, b.memory_bank), device
                )
            outputs.update(maps)
        elif isinstance(branch, MapDiff):
            seconds["diffusion pre-processing"], pixels = _timed(
                lambda b=branch: b.preprocess([image]), device
            )
            seconds["VAE encoder"], z0 = _timed(lambda b=branch, p=pixels: b.encode_latents(p), device)
            # the branch's own pass loop, each pass timed as it runs; the maps of each pass after it
            passes = branch.passes(z0)
            unet = maps_s = 0.0
            while True:
                elapsed, one = _timed(lambda p=passes: next(p, None), device)
                if one is None:
                    break
                unet += elapsed
                start = time.perf_counter()
                diff_l, diff_v = branch.maps_from_passes([one], branch.prompts, branch.memory_bank)
                outputs["diff_L"] = diff_l  # type: ignore[assignment]
                if diff_v is not None:
                    outputs["diff_V"] = diff_v
                maps_s += time.perf_counter() - start
            seconds["UNet"], seconds["diffusion maps"] = unet, maps_s
        else:
            seconds[f"{branch.name} (whole branch)"], produced = _timed(
                lambda b=branch: b.predict([image], batch_size=1), torch.device("cpu")
            )
            outputs.update(produced)
    start = time.perf_counter()
    detector.fuse({k: v.float().cpu() for k, v in outputs.items()})  # the detector's own fusion and terms
    seconds["fusion"] = time.perf_counter() - start
    return seconds


def measure(
    detector: Any,
    images: Sequence[Image.Image],
    *,
    batch_size: int,
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Latency per stage and per image at batch 1 (medians of ``repeats`` after a warm-up), images per
    second at ``batch_size`` (median of ``repeats`` batches after a warm-up batch), and the peak memory of
    the inference (resident set since the measurement started; CUDA: the allocator's peak), also at batch 1
    alone (``peak_rss_batch1_gb``: the throughput batch holds ``batch_size`` times the activations)."""
    say = progress or (lambda _message: None)
    devices = {getattr(b, "device", torch.device("cpu")) for b in detector.branches}
    cuda = next((d for d in devices if isinstance(d, torch.device) and d.type == "cuda"), None)
    sync_device = cuda or torch.device("cpu")
    if cuda is not None:
        torch.cuda.reset_peak_memory_stats(cuda)
    before = process_memory()  # the peak so far: loading, fitting
    reset = reset_peak_memory()
    say("warm-up")
    detector.predict([images[0]], batch_size=1)
    stage_runs, totals = [], []
    for i in range(repeats):
        say(f"batch 1, run {i + 1}/{repeats}")
        image = images[i % len(images)]
        stage_runs.append(stage_seconds(detector, image))
        totals.append(_timed(lambda image=image: detector.predict([image], batch_size=1), sync_device)[0])
    # the peak of batch 1 alone, before the throughput batch (a larger batch holds larger activations)
    at_batch_1 = process_memory()
    batch = [images[i % len(images)] for i in range(batch_size)]
    say(f"batch {batch_size}, warm-up")
    detector.predict(batch, batch_size=batch_size)
    batch_times = []
    for i in range(repeats):
        say(f"batch {batch_size}, run {i + 1}/{repeats}")
        batch_times.append(_timed(lambda: detector.predict(batch, batch_size=batch_size), sync_device)[0])
    memory = process_memory()
    out: dict[str, Any] = {
        "stages_s": {k: statistics.median(run[k] for run in stage_runs) for k in stage_runs[0]},
        "latency_s": statistics.median(totals),
        "batch_size": batch_size,
        "images_per_s": batch_size / statistics.median(batch_times),
        "peak_rss_gb": memory.get("peak_rss", 0) / 1e9 if reset else None,
        "peak_rss_batch1_gb": at_batch_1.get("peak_rss", 0) / 1e9 if reset else None,
        "peak_rss_before_gb": before.get("peak_rss", 0) / 1e9,
        "rss_gb": memory.get("rss", 0) / 1e9,
        "repeats": repeats,
    }
    if cuda is not None:
        out["peak_vram_gb"] = torch.cuda.max_memory_allocated(cuda) / 1e9
    return out


__all__ = ["measure", "stage_seconds"]
