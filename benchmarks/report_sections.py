"""RESULTS.md, the detailed sections: latency, throughput, stages, profile, ablation, memory, faithfulness.

Every section's heading ends with the machine's flags (:func:`benchmarks.machine.flags_line`): a figure is
only meaningful beside whether its CPU had AMX.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchmarks.common import short
from benchmarks.faithfulness import PEARSON_BAR
from benchmarks.stages import STAGES


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    value = seconds * 1e3
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.3f}"


def num(value: float | None, digits: int = 2) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.{digits}f}"


def pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.0f} %" if value >= 0.1 else f"{100 * value:.1f} %"


def mark(ok: bool | None) -> str:
    return "–" if ok is None else "pass" if ok else "**fail**"


def load_line(load: dict[str, Any] | None) -> str:
    if not load:
        return "–"
    parts = []
    if load.get("load_max") is not None:
        parts.append(f"load avg ≤ {load['load_max']:.2f}")
    if load.get("other_cpu_share") is not None:
        parts.append(f"other processes {100 * load['other_cpu_share']:.0f} % of the CPUs")
    return ", ".join(parts) or "–"


def contender_name(c: dict[str, Any]) -> str:
    system = "CLIPFusion" if c["system"] == "clipfusion" else "WinCLIP (anomalib)"
    if c["dtype"] == "auto":
        return f"{system} auto (→ {short(c['resolved'])})"
    shipped = " as shipped" if c["system"] == "winclip" and c["dtype"] == "float32" else ""
    return f"{system} {short(c['dtype'])}{shipped}"


def latency_section(comparison: dict[str, Any], settings: dict[str, Any], on: str) -> list[str]:
    contenders = comparison["contenders"]
    rows = []
    for c in contenders:
        cells = []
        for entry in comparison["latency"]:
            value = entry["times"].get(c["key"])
            cells.append(ms(value["median_s"]) if value else "not timed")
        rows.append((contender_name(c), *cells, ms(c["floor_s"]), ms(c.get("projected_s"))))
    regimes = [f"{e['regime']} ms" for e in comparison["latency"]]
    loads = "; ".join(f"{e['regime']}: {load_line(e.get('load'))}" for e in comparison["latency"])
    return [
        f"## Latency per image, batch 1 — {on}",
        "",
        table(("contender", *regimes, "floor ms (1-shot)", "projected ms (slowest kernels)"), rows),
        "",
        f"Median of {settings.get('repeats')} rounds after {settings.get('warmup')} warm-up; every round "
        "calls each contender once on the same image (interleaved, so the machine's drifting speed hits "
        "them alike). "
        "Models loaded and memory banks built beforehand; both systems start from decoded PIL images. Floor: "
        "the contender's FLOPs at the convolution and matmul peaks measured in this run for its dtype; "
        "projected: the same FLOPs at the slowest kernel measured of each kind. A contender projected "
        f"over {settings.get('max_call_s'):g} s per call is not interleaved (its memory run below times one "
        "call). "
        f"Load: {loads}.",
        "",
    ]


def throughput_section(
    thr: dict[str, Any], contenders: list[dict[str, Any]], settings: dict[str, Any], on: str
) -> list[str]:
    names = {c["key"]: contender_name(c) for c in contenders}
    rows = [
        (names[key], num(row["images_per_s"], 3), ms(row["median_s"] / thr["batch"]))
        for key, row in thr["rows"].items()
    ]
    return [
        f"## Throughput, batch {thr['batch']}, {thr['regime']} — {on}",
        "",
        table(("contender", "images/s", "ms/image"), rows),
        "",
        f"Median of {settings.get('throughput_repeats')} batches, interleaved; `auto` runs the batch of "
        "the dtype it resolves to. anomalib 2.x hands its window tokens to open_clip's batch-first "
        "transformer in the sequence-first layout, so WinCLIP's window attention grows with the square of "
        "the batch size; it is timed as shipped (tests/branches/test_patchclip_fidelity.py).",
        "",
    ]


def stages_section(key: str, name: str, stages: dict[str, Any], on: str) -> list[str]:
    rows = []
    for stage in STAGES:
        row = stages["stages"][stage]
        rows.append(
            (
                stage,
                short(row["dtype"]),
                ms(row["seconds"]),
                pct(row["seconds"] / stages["total_s"]) if stages["total_s"] else "–",
                num(row["gflop"], 1) if row["gflop"] else "–",
                pct(row["conv_share"]),
                num(row["achieved_gflops"], 0),
                ms(row["floor_s"]) if row["gflop"] else "–",
                pct(row["floor_fraction"]),
            )
        )
    rows.append(
        (
            "**total**",
            "",
            f"**{ms(stages['total_s'])}**",
            "",
            num(stages["gflop"], 1),
            "",
            "",
            f"**{ms(stages['floor_s'])}**",
            f"**{pct(stages['floor_fraction'])}**",
        )
    )
    return [
        f"## Time per stage, {name}, 1-shot, batch 1 — {on}",
        "",
        table(
            (
                "stage",
                "dtype",
                "ms",
                "share",
                "GFLOP",
                "of it conv",
                "achieved GFLOP/s",
                "floor ms",
                "floor reached",
            ),
            rows,
        ),
        "",
        "CLIP = image tower, VAE = `MapDiff.encode_latents`, UNet = `MapDiff.run_unet` (to its early "
        "exit), maps = the rest of the branches (pre-processing, map arithmetic, memory-bank search), "
        "fusion = `fuse`, other = image conversion and output arrays. Floor = conv FLOPs ÷ conv peak + "
        "matmul FLOPs ÷ matmul peak of the stage's dtype; floor reached = floor ÷ measured time. Median "
        f"of the stage runs ({len(stages.get('runs', []))}); load: {load_line(stages.get('load'))}.",
        "",
    ]


def profile_section(profile: dict[str, Any], on: str) -> list[str]:
    lines = [
        f"## Where the time goes inside the VAE encoder and the UNet ({short(profile['dtype'])}) — {on}",
        "",
    ]
    for part in ("VAE", "UNet"):
        p = profile[part]
        kinds = ", ".join(
            f"{kind} {pct(v / p['total_ms'])}" for kind, v in p["by_kind_ms"].items() if p["total_ms"]
        )
        rows = [(f"`{r['op']}`", r["kind"], num(r["ms"], 0), pct(r["share"]), r["calls"]) for r in p["top"]]
        lines += [
            f"### {part}: {num(p['total_ms'], 0)} ms of operators ({kinds})",
            "",
            table(("operator", "kind", "self ms", "share", "calls"), rows),
            "",
        ]
    lines += [
        "torch.profiler, one batch-1 pass after a warm-up, self time per aten operator. `other` is "
        "memory-bound work the floor does not count (normalisation, activation, addition, copies): the "
        "distance to close.",
        "",
    ]
    return lines


def ablation_section(ablation: dict[str, Any], what: dict[str, str], on: str) -> list[str]:
    variants = ablation["variants"]
    base = variants["default"]["median_s"]
    rows = []
    for name, row in variants.items():
        extra = f" (compile {row['compile_s']:.0f} s)" if row.get("compile_s") is not None else ""
        rows.append(
            (
                f"**{name}**" if name == "default" else name,
                what.get(name, "") + extra,
                ms(row["median_s"]),
                "1.00×" if name == "default" else f"{row['median_s'] / base:.2f}×",
                "–" if name == "default" else f"{row['map_max_abs_diff']:.1e}",
            )
        )
    return [
        f"## Each optimisation before and after (CLIPFusion 1-shot, batch 1, "
        f"{short(ablation['dtype'] or '?')}) — {on}",
        "",
        table(("variant", "what changes", "ms/image", "vs default", "max abs diff of the map"), rows),
        "",
        f"Median of {ablation['repeats']} rounds after a warm-up round, every variant once per round on "
        "the same query. Each variant is its own detector on the same modules (its own copy of the VAE "
        "where the optimisation lives in the module). Map difference: the fused map of the warm-up query "
        f"against the default's. Load: {load_line(ablation.get('load'))}.",
        "",
    ]


def memory_section(memory: list[dict[str, Any]], preset: str, on: str) -> list[str]:
    rows = []
    for item in memory:
        target = item.get("target_gb")
        rows.append(
            (
                item["name"],
                item.get("dtype", "?"),
                num(item.get("peak_inference_gb"), 2),
                num(item["peak_life_gb"], 2),
                num(item.get("rss_after_load_gb"), 2),
                f"< {target:g}: {mark(item.get('pass_inference'))}" if target else "–",
                f"{num(item.get('inference_s_per_image'), 1)} s ({item.get('images')} image(s))",
            )
        )
    return [
        f"## Peak memory, one fresh process per configuration — {on}",
        "",
        table(
            (
                "configuration",
                "runs in",
                "peak during inference GB",
                "peak, whole life GB",
                "RSS after load GB",
                "target (inference)",
                "time per image in this run",
            ),
            rows,
        ),
        "",
        f"`{preset}`, 1-shot, batch 1, built as `predict` and `evaluate` build (`CLIPFusion(objects=...)`: "
        "the prompts encoded and the text encoders freed before the image models load). Each configuration "
        "runs in a fresh interpreter (spawned), so its peaks count the pages its imports map, as a user's "
        "process does (runs before git 2107898 forked workers off a preloaded server, whose shared-library "
        "pages did not count: ≈ 0.3 GB lower). Inference = "
        "`VmHWM` after `echo 5 > /proc/self/clear_refs`; whole life includes the imports and the build. "
        "`before`: "
        "the same dtype with the text encoders loaded beside the image models and freed after the fit, "
        "the UNet's unreached blocks kept, diffusers' own VAE forward with its "
        "activations out of place (not the lean pass of `clipfusion.branches.mapdiff.lean_vae`) and glibc's "
        "default mmap threshold (not `runtime.map_large_blocks`). The "
        "time column is one call per image in a fresh process (not interleaved): the only timing a dtype "
        "too slow to interleave gets. GB = 10⁹ bytes.",
        "",
    ]


def faith_section(faith: dict[str, Any], on: str) -> list[str]:
    lines = []
    for name, rows in faith.items():
        body = [
            (
                key,
                num(row["pearson"], 4),
                num(row.get("min_per_image"), 4) if key != "score" else "–",
                f"{row['max_abs_diff']:.2e}",
                mark(row["pass"]),
            )
            for key, row in rows.items()
        ]
        lines += [
            f"### {name} against float32 — {on}",
            "",
            table(("output", "Pearson (pooled)", "min per image", "max abs diff", f"≥ {PEARSON_BAR}"), body),
            "",
        ]
    if lines:
        lines = [
            "## Reduced precision against float32 (same images, 1-shot; numerical faithfulness only)",
            "",
            *lines,
        ]
    return lines
