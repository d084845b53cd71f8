"""The comparison: CLIPFusion at each dtype (float32, bfloat16 and ``auto``) against anomalib's WinCLIP at
each of its dtypes (float32 as anomalib ships it, bfloat16), in one process, call by call interleaved.

FLOPs are counted once per model (they do not depend on the dtype) and turned into a floor per contender at
the peaks measured in the same run for its dtype. A contender whose call is projected to take longer than
``max_call_s`` at the slowest measured kernels of its dtype (a dtype the processor has no instructions for:
bfloat16 on an AVX2 CPU ran some kernels at a hundredth of float32's rate) is not interleaved (it would
take hours); the report gives its floor and projection instead, and its memory run times one call.
``auto`` is a detector of its own whose branches share the weights of the explicit dtype it resolves to
(:func:`benchmarks.common.twin_detector`), so it costs no second copy.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    OBJECT,
    branch_dtypes,
    build_detector,
    cycle,
    detector_overrides,
    regime,
    twin_detector,
)
from benchmarks.flops import by_kind, floor_seconds, flop_counter
from benchmarks.settings import Settings
from benchmarks.stages import floor_table, stage_dtypes, stage_flops, stage_times
from benchmarks.timing import CpuMonitor, median, time_interleaved
from clipfusion.runtime import free_device_memory

#: ``auto`` passes when it is at most this much slower than the faster explicit dtype
AUTO_TOLERANCE = 1.10


@dataclasses.dataclass
class Contender:
    """One system at one dtype: a fitted CLIPFusion detector or a WinCLIP baseline."""

    system: str  # "clipfusion" or "winclip"
    dtype: str  # as asked: float32, bfloat16, float16, auto
    resolved: str  # what it computes in
    model: Any
    floor_s: float | None = None  # its FLOPs at the best measured kernels of its dtype
    projected_s: float | None = None  # at the slowest measured kernels: what decides whether it is timed
    timed: bool = True

    @property
    def key(self) -> str:
        return f"{self.system} {self.dtype}"

    def fit(self, shots: int, references: list[Any]) -> None:
        if self.system == "clipfusion":
            self.model.fit(OBJECT, references[:shots])
        elif shots not in self.model.models:
            self.model.setup(shots, references)

    def predict(self, shots: int, images: list[Any]) -> Any:
        if self.system == "clipfusion":
            return self.model.predict(images, batch_size=len(images))
        return self.model.predict(shots, images)

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "system": self.system,
            "dtype": self.dtype,
            "resolved": self.resolved,
            "floor_s": self.floor_s,
            "projected_s": self.projected_s,
            "timed": self.timed,
        }


def build_contenders(settings: Settings, log: Callable[[str], None]) -> list[Contender]:
    """CLIPFusion per dtype (``auto`` on the weights of the dtype it resolves to) and WinCLIP per dtype."""
    from clipfusion.runtime import resolve_dtype, resolve_placement

    out: list[Contender] = []
    by_resolved: dict[str, Any] = {}
    for dtype in [d for d in settings.dtypes if d != "auto"]:
        det = build_detector(settings.preset, detector_overrides(settings.device, settings.overrides, dtype))
        resolved = branch_dtypes(det)
        by_resolved.setdefault(tuple(sorted(resolved.items())), det)
        out.append(Contender("clipfusion", dtype, _label(resolved), det))
        log(f"built CLIPFusion {dtype}")
    if "auto" in settings.dtypes:
        probe = build_config(settings, "auto")
        placement = resolve_placement(probe)
        resolved = {name: placement[name]["dtype"] for name in ("clip", "diffusion") if name in placement}
        twin_of = by_resolved.get(tuple(sorted(resolved.items())))
        if twin_of is not None:
            det = twin_detector(twin_of, dtype="auto")
        else:
            det = build_detector(
                settings.preset, detector_overrides(settings.device, settings.overrides, "auto")
            )
        out.append(Contender("clipfusion", "auto", _label(branch_dtypes(det)), det))
        log(f"auto: {placement.get('auto_dtype', '')}")
    if settings.winclip:
        from benchmarks.winclip import WinCLIPBaseline

        first = out[0].model
        for dtype in settings.winclip_dtypes:
            torch_dtype = resolve_dtype(dtype, torch.device(settings.device))
            baseline = WinCLIPBaseline(first.config.clip, settings.device, torch_dtype, first.clip.preprocess)
            out.append(Contender("winclip", dtype, str(torch_dtype).removeprefix("torch."), baseline))
    return out


def build_config(settings: Settings, dtype: str) -> Any:
    from clipfusion.config import load_preset

    overrides = {**settings.overrides, "device": settings.device, "dtype": dtype}
    return load_preset(settings.preset).replace(**overrides)


def _label(resolved: dict[str, str]) -> str:
    values = set(resolved.values())
    return values.pop() if len(values) == 1 else " / ".join(f"{k} {v}" for k, v in resolved.items())


def count_flops(
    contenders: list[Contender], references: list[Any], query: Any, peaks: dict[str, Any], device: str
) -> dict[str, Any]:
    """FLOPs of one 1-shot batch-1 prediction per system, counted on its fastest contender (the matmul peak
    of its dtype decides), and each contender's floor from them."""
    flops: dict[str, Any] = {}
    for system in ("clipfusion", "winclip"):
        mine = [c for c in contenders if c.system == system]
        if not mine:
            continue
        fastest = max(mine, key=lambda c: peaks["matmul"].get(c.resolved.split(" ")[-1], 0.0))
        fastest.fit(1, references)
        if system == "clipfusion":
            flops[system] = stage_flops(fastest.model, query, device)
        else:
            with flop_counter() as counter:
                fastest.predict(1, [query])
                flops[system] = {"total": by_kind(counter)}
    for contender in contenders:
        for slowest in (False, True):
            if (
                contender.system == "clipfusion"
            ):  # per stage: the maps and fusion are float32 whatever the dtype
                dtypes = stage_dtypes(contender.model)
                parts = [
                    floor_seconds(f, peaks, dtypes[s], slowest=slowest)
                    for s, f in flops["clipfusion"]["by_stage"].items()
                ]
                value = None if None in parts else sum(p for p in parts if p is not None)
            else:
                value = floor_seconds(flops["winclip"]["total"], peaks, contender.resolved, slowest=slowest)
            if slowest:
                contender.projected_s = value
            else:
                contender.floor_s = value
    return flops


def comparison_section(
    settings: Settings,
    references: list[Any],
    queries: list[Any],
    peaks: dict[str, Any],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Latency per regime (interleaved), time and floor per stage, throughput, and the check of ``auto``."""
    device = settings.device
    contenders = build_contenders(settings, log)
    flops = count_flops(contenders, references, queries[0], peaks, device)
    for c in contenders:
        c.timed = c.projected_s is not None and c.projected_s <= settings.max_call_s
        log(f"{c.key}: floor {c.floor_s or 0:.1f} s, projected {c.projected_s or 0:.0f} s (slowest kernels)")
        if not c.timed:
            log(f"{c.key}: not interleaved (projected over {settings.max_call_s:g} s per call)")
            c.model = None  # never called: its memory goes back before the timing
    timed = [c for c in contenders if c.timed]
    # one object name for the whole run: its prompts are embedded now and the text encoders dropped, as
    # `clipfusion predict` does (twins share their modules, so every one prepares before any releases)
    detectors = [c.model for c in timed if c.system == "clipfusion"]
    for det in detectors:
        det.prepare([OBJECT])
    for det in detectors:
        det.release_text_encoders()
    free_device_memory()
    out: dict[str, Any] = {"flops": flops, "latency": [], "stages": {}}

    for k in settings.shots:
        for c in timed:
            c.fit(k, references)
        fns = {
            c.key: functools.partial(lambda c, k, i: c.predict(k, [queries[i % len(queries)]]), c, k)
            for c in timed
        }
        with CpuMonitor() as monitor:
            times = time_interleaved(fns, warmup=settings.warmup, repeats=settings.repeats, device=device)
        entry = {"shots": k, "regime": regime(k), "load": monitor.result}
        entry["times"] = {key: {"median_s": median(v), "times_s": v} for key, v in times.items()}
        out["latency"].append(entry)
        log(
            f"{regime(k)}: "
            + ", ".join(f"{key} {v['median_s'] * 1e3:.0f} ms" for key, v in entry["times"].items())
        )

    stage_k = 1 if 1 in settings.shots else max(settings.shots)
    seen: set[str] = set()
    for c in timed:
        if c.system != "clipfusion" or c.resolved in seen:
            continue  # auto runs the same computation as the explicit dtype it resolved to
        seen.add(c.resolved)
        c.fit(stage_k, references)
        with CpuMonitor() as monitor:
            times = stage_times(c.model, queries, warmup=1, repeats=settings.stage_repeats, device=device)
        table = floor_table(times, flops["clipfusion"], stage_dtypes(c.model), peaks)
        out["stages"][c.key] = {**table, "shots": stage_k, "load": monitor.result, "runs": times["runs"]}
        log(f"{c.key} stages: floor reached {100 * (table['floor_fraction'] or 0):.0f} %")

    if settings.throughput:
        out["throughput"] = throughput(settings, timed, references, queries)
    resolved = next((c for c in timed if c.system == "clipfusion" and c.dtype == "auto"), None)
    if settings.profile and resolved is not None and resolved.model.diffusion is not None:
        from benchmarks.profiling import profile_diffusion

        resolved.fit(1, references)
        out["profile"] = profile_diffusion(resolved.model, queries[0], device)
    out["contenders"] = [c.record() for c in contenders]
    out["auto"] = auto_check(out, contenders)
    contenders.clear()
    return out


def throughput(settings: Settings, timed: list[Contender], references: list[Any], queries: list[Any]) -> dict:
    """Images per second at ``settings.batch``, k = 1, one call of each contender per round."""
    k = 1 if 1 in settings.shots else max(settings.shots)
    batch = cycle(queries, settings.batch)
    chosen, seen = [], set()
    for c in timed:
        if (c.system, c.resolved) not in seen:  # auto's batch is the explicit dtype's batch
            seen.add((c.system, c.resolved))
            chosen.append(c)
    for c in chosen:
        c.fit(k, references)
        if settings.throughput_warmup == 0:
            c.predict(k, batch[:1])  # at least a cheap call after the other contenders ran
    with CpuMonitor() as monitor:
        times = time_interleaved(
            {c.key: functools.partial(lambda c, _i: c.predict(k, batch), c) for c in chosen},
            warmup=settings.throughput_warmup,
            repeats=settings.throughput_repeats,
            device=settings.device,
        )
    rows = {
        key: {"median_s": median(v), "times_s": v, "images_per_s": settings.batch / median(v)}
        for key, v in times.items()
    }
    return {"shots": k, "regime": regime(k), "batch": settings.batch, "rows": rows, "load": monitor.result}


def auto_check(out: dict[str, Any], contenders: list[Contender]) -> dict[str, Any] | None:
    """Is ``auto`` at most 10 % slower than the faster explicit dtype? Per regime: against the timed
    explicit dtypes' medians and, for one too slow to interleave, its floor (a lower bound of its time)."""
    auto = next((c for c in contenders if c.system == "clipfusion" and c.dtype == "auto"), None)
    if auto is None or not auto.timed:
        return None
    rows = []
    for entry in out["latency"]:
        auto_s = entry["times"][auto.key]["median_s"]
        bounds = {}
        for c in contenders:
            if c.system == "clipfusion" and c.dtype != "auto":
                bounds[c.dtype] = entry["times"][c.key]["median_s"] if c.timed else c.floor_s
        fastest = min(bounds, key=lambda d: bounds[d]) if bounds else None
        ratio = auto_s / bounds[fastest] if fastest else None
        # an explicit dtype too slow to interleave is bounded by its floor: a ratio within the tolerance
        # against that lower bound holds against its real time too; one beyond it proves nothing
        measured = fastest is not None and next(c for c in contenders if c.dtype == fastest).timed
        if ratio is None:
            verdict = None
        elif ratio <= AUTO_TOLERANCE:
            verdict = True
        else:
            verdict = False if measured else None
        rows.append(
            {"regime": entry["regime"], "auto_s": auto_s, "fastest": fastest, "ratio": ratio, "pass": verdict}
        )
    return {"resolved": auto.resolved, "tolerance": AUTO_TOLERANCE, "rows": rows}
