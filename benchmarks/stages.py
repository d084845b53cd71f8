"""Time and FLOPs per stage of one prediction, and their distance to the compute floor.

The stage methods (``PatchCLIP.encode``/``window_embeddings``, ``MapDiff.encode_latents``/``run_unet`` and
``clipfusion.detector.fuse_components``) are wrapped on the instances for the duration of a ``with`` block
only: nothing else changes, no code path is altered. Wrapping the method rather than hooking the module is
what makes the UNet's time right: the UNet pass ends early by raising from a forward hook, so a post-hook
on the UNet would never fire.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.flops import KINDS, by_kind, floor_seconds, flop_counter
from benchmarks.timing import median, sync

STAGES = ("CLIP", "VAE", "UNet", "maps", "fusion", "other")
_MISSING = object()


class StageProbe:
    """Times (and, given a ``FlopCounterMode``, counts the FLOPs per kernel kind of) the detector's stages.

    Only the outermost wrapped call is charged, so a stage that calls another is not counted twice. A stage
    method that does not exist (a refactoring renamed it) is listed in ``missing`` and its time falls into
    ``maps``.
    """

    def __init__(self, det: Any, device: str, counter: Any | None = None) -> None:
        import clipfusion.detector as detector_module

        self.device = device
        self.counter = counter
        self.seconds: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.flops: dict[str, dict[str, int]] = {stage: dict.fromkeys(KINDS, 0) for stage in STAGES}
        self.calls: dict[str, int] = dict.fromkeys(STAGES, 0)
        clip, diffusion = getattr(det, "clip", None), getattr(det, "diffusion", None)
        candidates = [
            ("CLIP", clip, "encode"),
            ("CLIP", clip, "window_embeddings"),
            ("VAE", diffusion, "encode_latents"),
            ("UNet", diffusion, "run_unet"),
            ("fusion", detector_module, "fuse_components"),
        ]
        self.targets = [(s, o, a) for s, o, a in candidates if o is not None and hasattr(o, a)]
        wanted = {"CLIP": clip, "VAE": diffusion, "UNet": diffusion, "fusion": detector_module}
        found = {s for s, _, _ in self.targets}
        self.missing = [s for s, owner in wanted.items() if owner is not None and s not in found]
        self._saved: list[tuple[Any, str, Any]] = []
        self._active = False

    def _wrap(self, stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self._active:
                return fn(*args, **kwargs)
            self._active = True
            sync(self.device)
            before = by_kind(self.counter) if self.counter is not None else None
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.seconds[stage] += time.perf_counter() - start
                if before is not None:
                    after = by_kind(self.counter)
                    for kind in KINDS:
                        self.flops[stage][kind] += after[kind] - before[kind]
                self.calls[stage] += 1
                self._active = False

        return wrapper

    def __enter__(self) -> StageProbe:
        for stage, owner, attr in self.targets:
            self._saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
            setattr(owner, attr, self._wrap(stage, getattr(owner, attr)))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, attr, saved in reversed(self._saved):
            if saved is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, saved)
        self._saved.clear()


def _branch_times(det: Any) -> dict[str, float] | None:
    timings = getattr(det, "timings", None)
    if not isinstance(timings, dict):
        return None
    return {key: float(timings.get(key, 0.0)) for key in ("clip", "diffusion")}


def split_stages(
    total: float, probe: StageProbe, before: dict[str, float] | None, after: Any
) -> dict[str, float]:
    """Stage seconds of one run: wrapped stages as measured; ``maps`` = the branches' own time minus their
    wrapped stages; ``other`` = the rest (image conversion, output arrays). Without the detector's branch
    timings, ``maps`` takes the whole remainder."""
    out = {stage: probe.seconds[stage] for stage in ("CLIP", "VAE", "UNet", "fusion")}
    core = out["CLIP"] + out["VAE"] + out["UNet"]
    if before is not None and after is not None:
        branches = sum(after[k] - before[k] for k in before)
        out["maps"] = max(0.0, branches - core)
        out["other"] = max(0.0, total - branches - out["fusion"])
    else:
        out["maps"] = max(0.0, total - core - out["fusion"])
        out["other"] = 0.0
    return {stage: out[stage] for stage in STAGES}


def stage_times(
    det: Any, queries: Sequence[Any], *, warmup: int, repeats: int, device: str
) -> dict[str, Any]:
    """Median seconds per stage over ``repeats`` batch-1 predictions after ``warmup``."""
    runs: list[dict[str, float]] = []
    totals: list[float] = []
    missing: list[str] = []
    for i in range(warmup + repeats):
        before = _branch_times(det)
        with StageProbe(det, device) as probe:
            sync(device)
            start = time.perf_counter()
            det.predict([queries[i % len(queries)]], batch_size=1)
            sync(device)
            total = time.perf_counter() - start
        missing = probe.missing
        if i >= warmup:
            runs.append(split_stages(total, probe, before, _branch_times(det)))
            totals.append(total)
    return {
        "seconds": {stage: median([run[stage] for run in runs]) for stage in STAGES},
        "total_s": median(totals),
        "runs": runs,
        "missing_stages": missing,
    }


def stage_flops(det: Any, query: Any, device: str) -> dict[str, Any]:
    """FLOPs per stage and kernel kind of one batch-1 prediction (the same at every dtype, so counted once
    per model, at a fast dtype). ``maps`` gets what no wrapped stage did (memory-bank search, map
    arithmetic)."""
    with flop_counter() as counter, StageProbe(det, device, counter) as probe:
        det.predict([query], batch_size=1)
        total = by_kind(counter)
    flops = {stage: dict(probe.flops[stage]) for stage in STAGES}
    for kind in KINDS:
        flops["maps"][kind] = max(0, total[kind] - sum(flops[s][kind] for s in STAGES if s != "maps"))
    return {"by_stage": flops, "total": total}


def stage_dtypes(det: Any) -> dict[str, str]:
    """The dtype each stage computes in (the maps and the fusion are float32 by design)."""
    from benchmarks.common import branch_dtypes

    dtypes = branch_dtypes(det)
    clip, diffusion = dtypes.get("clip", "float32"), dtypes.get("diffusion", "float32")
    return {
        "CLIP": clip,
        "VAE": diffusion,
        "UNet": diffusion,
        "maps": "float32",
        "fusion": "float32",
        "other": "float32",
    }


def floor_table(
    times: dict[str, Any], flops: dict[str, Any], dtypes: dict[str, str], peaks: dict[str, Any]
) -> dict[str, Any]:
    """Per stage: dtype, GFLOP, achieved GFLOP/s, the floor (FLOPs at the measured conv and matmul peaks of
    the stage's dtype) and the fraction of it reached; overall the same for the whole prediction."""
    rows: dict[str, Any] = {}
    floor_total = 0.0
    for stage in STAGES:
        seconds, by_kind_flops = times["seconds"][stage], flops["by_stage"][stage]
        total_flops = sum(by_kind_flops.values())
        floor = floor_seconds(by_kind_flops, peaks, dtypes[stage]) if total_flops else 0.0
        floor_total += floor or 0.0
        rows[stage] = {
            "dtype": dtypes[stage],
            "seconds": seconds,
            "gflop": total_flops / 1e9,
            "conv_share": by_kind_flops["conv"] / total_flops if total_flops else None,
            "achieved_gflops": total_flops / seconds / 1e9 if seconds > 0 and total_flops else None,
            "floor_s": floor,
            "floor_fraction": floor / seconds if floor and seconds > 0 else None,
        }
    total_s = times["total_s"]
    return {
        "stages": rows,
        "total_s": total_s,
        "gflop": sum(flops["total"].values()) / 1e9,
        "floor_s": floor_total,
        "floor_fraction": floor_total / total_s if total_s > 0 else None,
    }
