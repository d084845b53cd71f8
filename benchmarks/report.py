"""RESULTS.md: the summary to paste into the README, the targets, the machine and its measured peaks, then
the detailed sections (:mod:`benchmarks.report_sections`). Every heading carries the machine's flags."""

from __future__ import annotations

from typing import Any

from benchmarks import LABEL
from benchmarks.ablation import VARIANTS
from benchmarks.common import short
from benchmarks.faithfulness import lowest_pearson
from benchmarks.machine import flags_line
from benchmarks.report_sections import (
    ablation_section,
    contender_name,
    faith_section,
    latency_section,
    load_line,
    mark,
    memory_section,
    ms,
    num,
    pct,
    profile_section,
    stages_section,
    table,
    throughput_section,
)

FLOOR_TARGET = 0.80


def render_markdown(
    results: dict[str, Any], gpu: dict[str, Any] | None = None, *, title: str | None = None
) -> str:
    """The whole report; ``gpu``: the results of a CUDA run, appended as the GPU section of a CPU report."""
    machine = results.get("machine", {})
    on = flags_line(machine)
    settings = results.get("settings", {})
    preset = settings.get("preset", "?")
    lines = [
        f"# {title or 'CLIPFusion speed and memory'}",
        "",
        f"> **{LABEL}.** {_preset_note(preset)}",
        "",
        f"Command: `{results.get('command', '')}`  ",
        f"Run: {results.get('started', '?')} → {results.get('finished', '?')} (UTC), clipfusion "
        f"{machine.get('versions', {}).get('clipfusion', '?')}, git {machine.get('git') or '?'}  ",
        f'Machine: **{on}**; `dtype = "auto"` → {machine.get("auto_dtype", "?")}  ',
        f"Load during the timed sections: {load_line(results.get('load'))}"
        + ("  " if _probe(results) else ""),
        *_probe(results),
        "",
    ]
    if results.get("errors"):
        lines += ["**Sections that failed:**", ""] + [f"- {e}" for e in results["errors"]] + [""]
    comparison = results.get("comparison")
    if comparison:
        lines += summary_section(results, on)
        lines += targets_section(results, on)
    lines += machine_section(results, on)
    if comparison:
        lines += latency_section(comparison, settings, on)
        if comparison.get("throughput"):
            lines += throughput_section(comparison["throughput"], comparison["contenders"], settings, on)
        names = {c["key"]: contender_name(c) for c in comparison["contenders"]}
        for key, stages in comparison.get("stages", {}).items():
            lines += stages_section(key, names[key], stages, on)
        if comparison.get("profile"):
            lines += profile_section(comparison["profile"], on)
    if results.get("ablation"):
        lines += ablation_section(results["ablation"], dict(VARIANTS), on)
    if results.get("memory"):
        lines += memory_section(results["memory"], preset, on)
    if results.get("faithfulness"):
        lines += faith_section(results["faithfulness"], on)
    if gpu is not None:
        gpu_md = render_markdown(gpu, title="GPU").split("\n")
        lines += ["", "## GPU", "", *["#" + line if line.startswith("#") else line for line in gpu_md[1:]]]
    return "\n".join(lines).rstrip() + "\n"


def _preset_note(preset: str) -> str:
    if preset == "random-full":
        return (
            "The `random-full` preset builds the real architectures (OpenCLIP ViT-B-16-plus-240; SD-2 "
            "inpainting VAE + UNet) with seeded random weights: the compute and memory are the `paper` "
            "configuration's; the scores and maps mean nothing about anomalies."
        )
    if preset == "tiny":
        return "The `tiny` preset: miniature random models, a smoke run of the harness, not the real compute."
    return f"Preset `{preset}`."


def _probe(results: dict[str, Any]) -> list[str]:
    start, end = results.get("probe_start"), results.get("probe_end")
    if not start or not end:
        return []
    return [
        f"Machine speed probe, start → end of the timed sections: fp32 matmul "
        f"{start['matmul_fp32_gflops']:.0f} → {end['matmul_fp32_gflops']:.0f} GFLOP/s, memory copy "
        f"{start['copy_gb_s']:.1f} → {end['copy_gb_s']:.1f} GB/s"
    ]


def _memory_by_dtype(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in results.get("memory", [])}


def _peaks(item: dict[str, Any]) -> str:
    return f"{num(item.get('peak_inference_gb'), 2)} / {num(item['peak_life_gb'], 2)}"


def summary_section(results: dict[str, Any], on: str) -> list[str]:
    """One column per contender: the figures a reader compares, to paste into the README."""
    comparison = results["comparison"]
    contenders = comparison["contenders"]
    memory = _memory_by_dtype(results)
    faith = results.get("faithfulness", {})
    reference = next(
        (e for e in comparison["latency"] if e["shots"] == 1),
        comparison["latency"][-1] if comparison["latency"] else None,
    )
    baseline = reference["times"].get("winclip float32", {}).get("median_s") if reference else None
    rows: dict[str, list[str]] = {}

    def put(label: str, values: list[str]) -> None:
        rows[label] = values

    for entry in comparison["latency"]:
        cells = []
        for c in contenders:
            value = entry["times"].get(c["key"])
            if value:
                cells.append(ms(value["median_s"]))
            else:
                once = (
                    memory.get(c["dtype"], {}).get("inference_s_per_image")
                    if c["system"] == "clipfusion"
                    else None
                )
                cells.append(
                    f"≥ {ms(c['floor_s'])} (floor){f'; one call {ms(once)}' if once else ''}"
                    if c["floor_s"]
                    else "–"
                )
        put(f"ms/image, {entry['regime']}, batch 1", cells)
    if reference and baseline:
        put(
            f"vs WinCLIP fp32 as shipped ({reference['regime']})",
            [
                f"{reference['times'][c['key']]['median_s'] / baseline:.2f}×"
                if c["key"] in reference["times"]
                else "–"
                for c in contenders
            ],
        )
    thr = comparison.get("throughput")
    if thr:
        cells = []
        for c in contenders:
            twin = f"clipfusion {c['resolved']}" if c["dtype"] == "auto" else None
            if c["key"] in thr["rows"]:
                cells.append(num(thr["rows"][c["key"]]["images_per_s"], 3))
            elif twin in thr["rows"]:  # auto runs the batch of the dtype it resolves to
                cells.append(f"{num(thr['rows'][twin]['images_per_s'], 3)} (= {short(c['resolved'])})")
            else:
                cells.append("–")
        put(f"images/s, batch {thr['batch']}, {thr['regime']}", cells)
    flops = comparison.get("flops", {})
    gflop = [sum(flops.get(c["system"], {}).get("total", {}).values()) / 1e9 for c in contenders]
    put("GFLOP per image (1-shot)", [num(g, 0 if g >= 100 else 1) for g in gflop])
    floor_cells = []
    for c in contenders:
        stages = comparison.get("stages", {}).get(c["key"])
        if stages is None and c["dtype"] == "auto":
            twin = next(
                (o for o in contenders if o["system"] == "clipfusion" and o["dtype"] == c["resolved"]), None
            )
            stages = comparison.get("stages", {}).get(twin["key"]) if twin else None
        if stages is not None:
            floor_cells.append(pct(stages["floor_fraction"]))
        elif c["system"] == "winclip" and reference and c["key"] in reference["times"] and c["floor_s"]:
            floor_cells.append(pct(c["floor_s"] / reference["times"][c["key"]]["median_s"]))
        else:
            floor_cells.append("–")
    put("share of the compute floor reached (1-shot)", floor_cells)
    put(
        "peak RSS GB, inference / whole life (1-shot)",
        [
            _peaks(memory[c["dtype"]]) if c["system"] == "clipfusion" and c["dtype"] in memory else "–"
            for c in contenders
        ],
    )
    put(
        "lowest Pearson against fp32 (maps, scores)",
        [
            num(lowest_pearson(faith[c["dtype"]]), 4)
            if c["system"] == "clipfusion" and c["dtype"] in faith
            else "–"
            for c in contenders
        ],
    )
    return [
        f"## Summary — {on} ({LABEL})",
        "",
        table(
            ("", *[contender_name(c) for c in contenders]),
            [(label, *values) for label, values in rows.items()],
        ),
        "",
    ]


def targets_section(results: dict[str, Any], on: str) -> list[str]:
    """Issue 12's targets, each with its figure and verdict on this machine."""
    comparison = results["comparison"]
    machine = results.get("machine", {})
    rows = []
    auto = comparison.get("auto")
    for row in (auto or {}).get("rows", []):
        rows.append(
            (
                f"`auto` ≤ 1.10× the faster of fp32/bf16 ({row['regime']})",
                f"{num(row['ratio'], 2)}× the {short(row['fastest'] or '?')} time",
                mark(row["pass"]) if row["pass"] is not None else "undecided",
            )
        )
    resolved = next((c for c in comparison["contenders"] if c["dtype"] == "auto"), None)
    if resolved is not None:
        twin = next(
            (
                c
                for c in comparison["contenders"]
                if c["system"] == "clipfusion" and c["dtype"] == resolved["resolved"]
            ),
            None,
        )
        stages = comparison.get("stages", {}).get(twin["key"] if twin else resolved["key"])
        if stages:
            fraction = stages["floor_fraction"]
            rows.append(
                (
                    f"≥ {FLOOR_TARGET:.0%} of the compute floor at the resolved dtype "
                    f"({short(resolved['resolved'])})",
                    pct(fraction),
                    mark(fraction is not None and fraction >= FLOOR_TARGET),
                )
            )
    auto_memory = _memory_by_dtype(results).get("auto")
    if auto_memory:
        rows.append(
            (
                f"peak RSS at the resolved dtype < {auto_memory.get('target_gb') or '?'} GB "
                "(inference, k = 1)",
                f"{num(auto_memory.get('peak_inference_gb'), 2)} GB",
                mark(auto_memory.get("pass_inference")),
            )
        )
    if not machine.get("gpu"):
        amx = "measured here" if machine.get("amx") else "not measurable: this CPU has no AMX"
        rows.append(
            ("on a CPU with AMX: CLIPFusion ≤ 1.0× WinCLIP fp32, ≤ 2.0× at equal dtype (bf16)", amx, "–")
        )
    return [f"## Targets (issue 12) — {on}", "", table(("target", "figure", "verdict"), rows), ""]


def machine_section(results: dict[str, Any], on: str) -> list[str]:
    machine = results.get("machine", {})
    caps = ", ".join(k for k, v in machine.get("torch_capabilities", {}).items() if v is True)
    rows = [
        ("CPU", machine.get("cpu", "?")),
        (
            "flags (`/proc/cpuinfo`, as `lscpu`)",
            ", ".join(machine.get("cpuinfo_flags", [])) or "none of interest",
        ),
        ("torch CPU capability", machine.get("torch_cpu_capability")),
        ("`torch.cpu.get_capabilities()`", caps or "–"),
        ("AMX (bfloat16 matrix unit)", "yes" if machine.get("amx") else "**no**"),
        ('`dtype = "auto"` resolves to', machine.get("auto_dtype")),
        (
            "cores (logical / usable), torch threads",
            f"{machine.get('logical_cores')} / {machine.get('usable_cores')}, {machine.get('torch_threads')}",
        ),
        ("memory", f"{num(machine.get('memory_gb'), 1)} GB"),
    ]
    if machine.get("gpu"):
        rows.append(
            (
                "GPU",
                f"{machine['gpu']} ({num(machine.get('gpu_memory_gb'), 0)} GB, CUDA {machine.get('cuda')})",
            )
        )
    rows += [("python", machine.get("python")), *machine.get("versions", {}).items()]
    lines = ["## Machine", "", table(("", ""), rows), ""]
    peaks = results.get("peaks") or {}
    dtypes = list(peaks.get("matmul", {}))
    if dtypes:
        settings = results.get("settings", {})
        n = settings.get("matmul_n", "?")
        kernels = peaks.get("matmul_kernels", {})
        body = [
            (
                f"**matmul peak** {n}×{n} (best below)",
                *[f"**{num(peaks['matmul'].get(d), 1)}**" for d in dtypes],
            )
        ]
        for kernel in ("mm", "linear"):
            body.append((f"`{kernel}` {n}×{n}", *[num(kernels.get(d, {}).get(kernel), 1) for d in dtypes]))
        body.append(
            ("**convolution peak** (best below)", *[f"**{num(peaks['conv'].get(d), 1)}**" for d in dtypes])
        )
        shapes = list(next(iter(peaks.get("conv_shapes", {}).values()), {}))
        for shape in shapes:
            body.append(
                (
                    f"conv 3×3 {shape}, channels-last",
                    *[num(peaks["conv_shapes"][d].get(shape), 1) for d in dtypes],
                )
            )
        lines += [
            f"### Measured compute peaks, GFLOP/s (the floor's reference) — {on}",
            "",
            table(("kernel", *[short(d) for d in dtypes]), body),
            "",
            "Best of a few calls each (a peak is what the hardware can do; noise only slows a call). A dtype "
            "without hardware support is timed once.",
            "",
        ]
    return lines
